"""The documents agree with the code: the configuration reference is the schema's, the README is short
and links only inside the repository."""
import re

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_generated_from_the_schema():
    from draftpick.workers.config import reference_markdown

    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == reference_markdown(), "regenerate: python3 -m draftpick.workers.config > docs/configuration.md"


def test_every_configuration_field_is_documented():
    from draftpick.workers.config import SECTIONS

    doc = (ROOT / "docs" / "configuration.md").read_text()
    for _, model in SECTIONS:
        for name in model.model_fields:
            assert f"| `{name}` |" in doc, name


def test_readme_is_short_and_its_links_stay_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12_500
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links, "the README links to docs/"
    for link in links:
        assert "://" not in link, link
        assert (ROOT / link.split("#")[0]).exists(), link


def test_readme_commands_are_commands_of_the_cli():
    from draftpick.deploy.cli import _parser

    commands = set(_parser()._subparsers._group_actions[0].choices)
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S))
    used = re.findall(r"draftpick ([a-z]+)", blocks)
    assert "generate" in used
    for command in used:
        assert command in commands, command


def test_the_deployment_files_name_the_application_builder_that_exists():
    """serve.yaml, the KubeRay RayService and build_app agree; the cluster launcher file is complete."""
    import importlib

    import yaml
    from ray.serve import Application

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    serve_app = yaml.safe_load((deploy / "serve.yaml").read_text())["applications"][0]
    rayservice = yaml.safe_load((deploy / "kuberay-rayservice.yaml").read_text())
    kube_app = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    assert serve_app["import_path"] == kube_app["import_path"]
    module, _, name = serve_app["import_path"].partition(":")
    app = getattr(importlib.import_module(module), name)(serve_app["args"])
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown args"):
        getattr(importlib.import_module(module), name)({"confg": None})
    cluster = yaml.safe_load((deploy / "cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert any("draftpick setup" in c for c in cluster["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(cluster[k]) for k in ("head_start_ray_commands",
                                                                       "worker_start_ray_commands"))
