"""The Ray worker actor: one engine (target + drafters) serving concurrent requests.

One loop per worker steps every request in flight together: each step is one target forward
for all of them (`SpeculativeEngine.step_batch`: each request's pending token and drafts, or a
joining request's prompt), run on the worker's engine thread, after which each request streams
the tokens its round emitted. Requests join at the next step and leave as soon as they finish; a
request whose client went away is cancelled between steps. With `worker.batching` false the loop steps one request at a
time, round-robin (the interleaved worker, kept for comparison). The engine itself knows nothing of
Ray (see workers.engine).

All the models' work runs on that one thread, which also loads and fingerprints them: torch's
OpenMP keeps a team of threads per thread that ever ran a parallel region, and with two teams on
two cores it stops spinning between regions and wakes its threads through the kernel each time,
which doubled the time of a batched step here (docs/results.md, "The worker's engine thread and growing cache").
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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


@dataclass
class _Slot:
    """A request in the worker's loop: its generation and the queue its stream reads."""

    g: object  # workers.engine.Generation
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # (tokens, stop_at), an exception, or None (done)
    cancelled: bool = False  # its stream was closed: cancel it between steps


class EngineWorker:
    """Ray actor body (wrap with `worker_actor(cfg)`); testable as a plain class too."""

    def __init__(self, cfg: DraftpickConfig, redis_url: str | None = None, start_controller: bool = False):
        """redis_url: learn live. Each finished request's rounds go to the feedback stream (a sink on
        the engine), and requests without an arm are decided through the controller actor, or
        by this worker over its own snapshot when the actor is down (controller.actor.DecisionClient).
        start_controller: start (or find) the controller actor first; without a redis_url it then
        learns in $REDIS_URL, else in the controller's embedded Redis (controller.actor.service_redis_url)."""
        self.cfg = cfg
        # the one thread that runs the models: it loads (and fingerprints) them here and runs every
        # step (see above)
        self.engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draftpick-engine")
        self.engine, self.description = self.engine_thread.submit(
            _build_engine, cfg, bool(redis_url or start_controller)).result()
        self.joining: list[_Slot] = []  # admitted, joining at the next step
        self.running: list[_Slot] = []  # in the batch
        self._loop_task = None
        self.steps = 0  # steps run (each one target forward when batching)
        self.in_flight = 0
        self.decisions = self.sink = None
        if redis_url or start_controller:
            from draftpick.controller.actor import DecisionClient, service_redis_url

            if start_controller:
                redis_url = service_redis_url(cfg, self.description, redis_url)
            self.decisions = DecisionClient(cfg, self.description, redis_url)
            self.sink = self.decisions.local.sink()
            self.engine.add_sink(self.sink)

    def info(self) -> dict:
        prefix = self.engine.prefix
        return {"drafters": list(self.engine.drafters), "in_flight": self.in_flight,
                **({"prefix_cache": prefix.status()} if prefix is not None else {}),
                **({"feedback": self.sink.status(), "decisions": self.decisions.status()} if self.sink else {})}

    def status(self) -> dict:
        """The components' state for /health: the engine (and its prefix cache), and when it learns
        the controller, Redis and the feedback sink."""
        out = {"engine": "up", "in_flight": self.in_flight, "forward_s": dict(self.engine.forward_s)}
        if self.engine.prefix is not None:
            out["prefix_cache"] = self.engine.prefix.status()
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

    async def _plan(self, req: GenerateRequest):
        """(arm, round chooser or None, plan or None) of a request: its own arm, or the controller's
        (awaited: the event loop goes on starting the steps of the requests in flight meanwhile)."""
        if req.arm is not None:
            return req.arm, None, None
        if self.decisions is None:
            raise ValueError("a request without an arm needs a worker that learns (started with a redis_url)")
        from draftpick.policies.types import Context

        ctx = Context(tag=req.context, features=req.features, temperature=req.params.temperature, load=self.in_flight + 1,
                      drafting=dict(self.engine.drafting))  # the last step's (a new Counter each step)
        plan = await self.decisions.decide_async(ctx)
        return plan.arm, self.decisions.local.chooser(plan, ctx), plan

    def tokenize(self, item: dict) -> list[int]:
        from draftpick.workers.inputs import encode_input

        return encode_input(self.engine.tokenizer, item)

    async def generate_stream(self, req: GenerateRequest):
        """Yields {"token_ids": [...], "stop_at": ...} per step (prefill or round), then
        {"result": <generate --json object>, "records": [...], "plan": ... or None}. Closing or
        cancelling the stream (its client went away) ends the generation with finish_reason "abort"
        at the next step; the rounds it ran still feed back."""
        arm, chooser, plan = await self._plan(req)
        if arm.k > self.cfg.engine.max_k:
            raise ValueError(f"k = {arm.k} exceeds engine.max_k = {self.cfg.engine.max_k}")
        g = self.engine.start(req.prompt_ids, req.params, arm, tenant=req.tenant, context=req.context,
                              chooser=chooser, load=lambda: self.in_flight, features=req.features)
        slot = _Slot(g)
        self.joining.append(slot)
        self.in_flight += 1
        self._ensure_loop()
        try:
            while True:
                item = await slot.out.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise item
                tokens, stop_at = item
                yield {"token_ids": tokens, "stop_at": stop_at}
        finally:
            self.in_flight -= 1
            slot.cancelled = not g.done  # the loop cancels it between steps
        res = g.result()
        yield {"result": res.to_json(req.request_id), "records": [r.to_dict() for r in res.records],
               "plan": None if plan is None else plan_json(plan)}

    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._loop_task
        if task is None or task.done() or task.get_loop() is not loop:
            self._loop_task = loop.create_task(self._loop())

    async def _loop(self) -> None:
        """Step the requests in flight until none is left. Between steps (in the event loop, the
        models idle): cancel the requests whose stream closed, let joining requests in while the
        step's rows fit worker.max_batch_tokens (`_admit`). A step runs on the engine thread; if this
        task is cancelled the step still ends before it does (the models never run two steps at once)."""
        w = self.cfg.worker
        while self.running or self.joining:
            for s in [s for s in self.running + self.joining if s.cancelled]:
                s.g.cancel()  # its rounds go to the sinks
                (self.running if s in self.running else self.joining).remove(s)
            chunk = w.prefill_chunk if w.batching else 0
            self._admit(chunk)
            if not self.running:
                continue
            batch = self.running if w.batching else [self.running[0]]
            if not w.batching:  # round-robin
                self.running.append(self.running.pop(0))
            task = asyncio.get_running_loop().run_in_executor(
                self.engine_thread, self.engine.step_batch, [s.g for s in batch], w.max_batch_tokens, chunk or None)
            try:
                results = await asyncio.shield(task)
            except asyncio.CancelledError:
                await task
                raise
            except Exception as e:  # the forward itself failed: every request in it fails
                results = [e] * len(batch)
                for s in batch:
                    s.g.fail()
            self.steps += 1
            for s, r in zip(list(batch), results):
                if isinstance(r, Exception) or r:  # a prefill chunk before the last appends no token
                    s.out.put_nowait(r if isinstance(r, Exception) else (r, s.g.stop_at))
                if s.g.done:
                    s.out.put_nowait(None)
                    self.running.remove(s)

    def _admit(self, chunk: int) -> int:
        """Let joining requests into the batch while the next step's rows fit worker.max_batch_tokens
        (at least one joins each step, however long its prompt); returns how many joined. A decoding
        request counts one row (the engine cuts drafts to fit); prefills count their prompts, or with
        chunked prefill one budget of `chunk` rows that all prefilling requests share, as the engine
        runs them."""
        joined, bound = 0, self.cfg.worker.max_batch_tokens
        while self.joining and (not joined or _rows(self.running + self.joining[:1], chunk) <= bound):
            self.running.append(self.joining.pop(0))
            joined += 1
        return joined

    async def generate(self, req: GenerateRequest) -> dict:
        last = None
        async for chunk in self.generate_stream(req):
            last = chunk
        return last


def _build_engine(cfg: DraftpickConfig, learns: bool):
    """(engine, its description for the controller's namespace when the worker learns, else None):
    on the engine thread, as the description reads every weight (controller.controller.fingerprint)."""
    from draftpick.controller.controller import describe
    from draftpick.workers.factory import build_engine
    from draftpick.workers.models import set_threads

    set_threads(cfg.worker.torch_threads)  # Ray would leave torch at 1 thread
    engine = build_engine(cfg)
    return engine, describe(cfg, engine) if learns else None


def _rows(slots: list[_Slot], chunk: int) -> int:
    """The rows a step of these requests runs before drafts: one per decoding request, plus the
    prompt tokens of those prefilling (at most `chunk` together with chunked prefill)."""
    prefill = sum(s.g.prefill_left for s in slots)
    decoding = sum(1 for s in slots if not s.g.prefill_left and not s.g.done)
    return decoding + (min(prefill, chunk) if chunk else prefill)


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
