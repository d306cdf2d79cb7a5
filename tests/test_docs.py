"""The documents agree with the code: the configuration reference is the schema's, the README is short
and links only inside the repository."""
import re
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
