"""The Ray worker actor: one engine (target + drafters) serving concurrent requests.

Requests are interleaved round by round: each round runs in a thread under
an asyncio lock (FIFO), so concurrent requests share the models fairly and
each streams its tokens as soon as its round ends. The engine itself knows
nothing of Ray (see workers.engine).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray

from draftpick.controller.local import plan_json
from draftpick.policies.types import Arm
from draftpick.workers.config import DraftpickConfig
from draftpick.workers.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: list[int]
    params: SamplingParams
    arm: Arm | None  # None: the controller decides (the worker needs a redis_url)
    tenant: str = ""
    context: str = ""
    request_id: str | None = None
    features: tuple[float, ...] = ()


class EngineWorker:
    """Ray actor body (wrap with `worker_actor(cfg)`); testable as a plain class too."""

    def __init__(self, cfg: DraftpickConfig, redis_url: str | None = None, start_controller: bool = False):
        """redis_url: learn live. Each finished request's rounds go to the feedback stream (a sink on
        the engine), and requests without an arm are decided through the controller actor, or
        by this worker over its own snapshot when the actor is down (controller.actor.DecisionClient).
        start_controller: start (or find) the controller actor first; without a redis_url it then
        learns in $REDIS_URL, else in the controller's embedded Redis (controller.actor.service_redis_url)."""
        from draftpick.workers.factory import build_engine
        from draftpick.workers.models import set_threads

        set_threads(cfg.worker.torch_threads)  # Ray would leave torch at 1 thread
        self.cfg = cfg
        self.engine = build_engine(cfg)
        self.lock, self._lock_loop = asyncio.Lock(), None
        self.in_flight = 0
        self.decisions = self.sink = None
        if redis_url or start_controller:
            from draftpick.controller.actor import DecisionClient, service_redis_url
            from draftpick.controller.controller import describe

            self.description = describe(cfg, self.engine)
            if start_controller:
                redis_url = service_redis_url(cfg, self.description, redis_url)
            self.decisions = DecisionClient(cfg, self.description, redis_url)
            self.sink = self.decisions.local.sink()
            self.engine.add_sink(self.sink)

    def info(self) -> dict:
        return {"drafters": list(self.engine.drafters), "in_flight": self.in_flight,
                **({"feedback": self.sink.status(), "decisions": self.decisions.status()} if self.sink else {})}

    def status(self) -> dict:
        """The components' state for /health: the engine, and when it learns the controller, Redis
        and the feedback sink."""
        out = {"engine": "up", "in_flight": self.in_flight}
        if self.decisions is not None:
            out.update(self.decisions.status(), feedback=self.sink.status())
        return out

    def close(self) -> None:
        """Append the feedback still buffered (a replica stopping calls this)."""
        if self.sink is not None:
            self.sink.close(timeout=10)

    def limits(self) -> dict:
        """What the ingress checks a prompt against (workers.engine.check_prompt)."""
        return {"vocab_size": self.engine.vocab_size, "context_window": self.engine.context_window,
                "learns": self.decisions is not None}

    def stats(self) -> dict | None:
        """What `draftpick stats --json` prints (None: this worker does not learn)."""
        return None if self.decisions is None else self.decisions.local.stats()

    def _plan(self, req: GenerateRequest):
        """(arm, round chooser or None, plan or None) of a request: its own arm, or the controller's."""
        if req.arm is not None:
            return req.arm, None, None
        if self.decisions is None:
            raise ValueError("a request without an arm needs a worker that learns (started with a redis_url)")
        from draftpick.policies.types import Context

        ctx = Context(tag=req.context, features=req.features, temperature=req.params.temperature, load=self.in_flight + 1)
        plan = self.decisions.decide(ctx)
        return plan.arm, self.decisions.local.chooser(plan, ctx), plan

    def tokenize(self, item: dict) -> list[int]:
        from draftpick.workers.inputs import encode_input

        return encode_input(self.engine.tokenizer, item)

    async def generate_stream(self, req: GenerateRequest):
        """Yields {"token_ids": [...], "stop_at": ...} per step (prefill or round), then
        {"result": <generate --json object>, "records": [...], "plan": ... or None}. Closing or
        cancelling the stream (its client went away) ends the generation with finish_reason "abort";
        the rounds it ran still feed back."""
        arm, chooser, plan = self._plan(req)
        if arm.k > self.cfg.engine.max_k:
            raise ValueError(f"k = {arm.k} exceeds engine.max_k = {self.cfg.engine.max_k}")
        g = self.engine.start(req.prompt_ids, req.params, arm, tenant=req.tenant, context=req.context,
                              chooser=chooser, load=lambda: self.in_flight, features=req.features)
        self.in_flight += 1
        try:
            while not g.done:
                tokens = await self._step(g)
                yield {"token_ids": tokens, "stop_at": g.stop_at}
        finally:
            self.in_flight -= 1
            if not g.done:
                g.cancel()
        res = g.result()
        yield {"result": res.to_json(req.request_id), "records": [r.to_dict() for r in res.records],
               "plan": None if plan is None else plan_json(plan)}

    async def _step(self, g):
        """One step in a thread, one request's step at a time (FIFO). A cancelled caller waits for
        the step to end before the lock is released: the models never run two steps at once."""
        if self._lock_loop is not asyncio.get_running_loop():  # a lock serves one event loop
            self.lock, self._lock_loop = asyncio.Lock(), asyncio.get_running_loop()
        async with self.lock:
            task = asyncio.ensure_future(asyncio.to_thread(g.step))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                await task
                raise

    async def generate(self, req: GenerateRequest) -> dict:
        last = None
        async for chunk in self.generate_stream(req):
            last = chunk
        return last


def worker_actor(cfg: DraftpickConfig, redis_url: str | None = None):
    """Start one worker actor with the CPU/GPU shares and thread count from the configuration
    (with a redis_url it learns live, see EngineWorker)."""
    cls = ray.remote(EngineWorker).options(max_concurrency=cfg.worker.max_concurrency, **actor_resources(cfg.worker))
    return cls.remote(cfg, redis_url)


def actor_resources(w) -> dict:
    """A worker's Ray actor options from the configuration's `worker` section: CPU / GPU shares, and
    the thread count in its environment (the worker actor here, the Serve worker deployment)."""
    threads = str(w.torch_threads)
    return {"num_cpus": w.num_cpus, "num_gpus": w.num_gpus,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}}
