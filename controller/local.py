"""The service's learning path without Ray, for the CLI: decide → generate → feedback → fold.

`draftpick generate` without a pinned arm asks the configured policy over the learned state in
Redis (REDIS_URL, else the embedded server), feeds every request's rounds back through the same
sink the service uses, and folds them before it exits, through the same consumer-group code, so
that `draftpick stats` right after shows them and the next run decides from them.
"""
from __future__ import annotations

import os

from draftpick.controller.controller import Plan, from_config
from draftpick.controller.feedback import CONTEXT
from draftpick.controller.redis_server import connect, default_data_dir
from draftpick.policies.features import prompt_features
from draftpick.policies.types import Context
from draftpick.workers.inputs import InputError, input_text


class LocalLearning:
    def __init__(self, cfg, engine, redis_url: str | None = None, data_dir=None):
        """redis_url: else REDIS_URL, else an embedded server with its data in data_dir (default:
        the service's, redis_server.default_data_dir(serve.name))."""
        self.engine = engine
        self.client, self.server = connect(redis_url, data_dir or default_data_dir(cfg.serve.name))
        self.redis_url = redis_url or os.environ.get("REDIS_URL") or self.server.url
        self.controller = from_config(cfg, engine, self.client)
        self.sink = self.controller.sink()
        engine.add_sink(self.sink)

    def generate(self, item: dict, ids: list[int], params, tenant: str = ""):
        """(result, plan) of one request decided by the policy."""
        ctx = request_context(item, ids, params.temperature)
        plan: Plan = self.controller.decide(ctx)
        res = self.engine.generate(ids, params, plan.arm, tenant=tenant, context=ctx.tag,
                                   chooser=self.controller.chooser(plan, ctx), features=ctx.features)
        return res, plan

    def close(self) -> int:
        """Append what is buffered, fold it, stop the embedded server; returns the entries folded."""
        try:
            self.sink.close()
            return self.controller.fold_pending()
        finally:
            if self.server is not None:
                self.server.stop()


def request_context(item: dict, ids: list[int], temperature: float) -> Context:
    """What the policy sees of a request: its context tag (checked) and its prompt features."""
    tag = item.get("tag", "")
    if not isinstance(tag, str) or not CONTEXT.match(tag):
        raise InputError(f"`tag` must be up to 64 letters, digits or _.:/-, got {tag!r}")
    return Context(tag=tag, features=prompt_features(input_text(item), ids, temperature), temperature=temperature)


def plan_json(plan: Plan) -> dict:
    """The `draftpick` object of a decided request's output."""
    return {"arm": str(plan.arm), "policy": plan.policy, "level": plan.level, "context": plan.context,
            "propensity": plan.propensity, "decision_s": plan.decided_s}
