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

from draftpick.policies.types import Arm
from draftpick.workers.config import DraftpickConfig
from draftpick.workers.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: list[int]
    params: SamplingParams
    arm: Arm
    tenant: str = ""
    context: str = ""
    request_id: str | None = None
    features: tuple[float, ...] = ()


class EngineWorker:
    """Ray actor body (wrap with `worker_actor(cfg)`); testable as a plain class too."""

    def __init__(self, cfg: DraftpickConfig):
        from draftpick.workers.factory import build_engine
        from draftpick.workers.models import set_threads

        set_threads(cfg.worker.torch_threads)  # Ray would leave torch at 1 thread
        self.cfg = cfg
        self.engine = build_engine(cfg)
        self.lock = asyncio.Lock()
        self.in_flight = 0

    def info(self) -> dict:
        return {"drafters": list(self.engine.drafters), "in_flight": self.in_flight}

    def tokenize(self, item: dict) -> list[int]:
        from draftpick.workers.inputs import encode_input

        return encode_input(self.engine.tokenizer, item)

    async def generate_stream(self, req: GenerateRequest):
        """Yields {"token_ids": [...]} per round, then {"result": <generate --json object>, "records": [...]}."""
        if req.arm.k > self.cfg.engine.max_k:
            raise ValueError(f"k = {req.arm.k} exceeds engine.max_k = {self.cfg.engine.max_k}")
        g = self.engine.start(req.prompt_ids, req.params, req.arm, tenant=req.tenant, context=req.context,
                              load=lambda: self.in_flight, features=req.features)
        self.in_flight += 1
        try:
            while not g.done:
                async with self.lock:
                    tokens = await asyncio.to_thread(g.step)
                yield {"token_ids": tokens}
        finally:
            self.in_flight -= 1
        res = g.result()
        yield {"result": res.to_json(req.request_id), "records": [r.to_dict() for r in res.records]}

    async def generate(self, req: GenerateRequest) -> dict:
        last = None
        async for chunk in self.generate_stream(req):
            last = chunk
        return last


def worker_actor(cfg: DraftpickConfig):
    """Start one worker actor with the CPU/GPU shares and thread count from the configuration."""
    w = cfg.worker
    threads = str(w.torch_threads)
    cls = ray.remote(EngineWorker).options(
        num_cpus=w.num_cpus, num_gpus=w.num_gpus, max_concurrency=w.max_concurrency,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
    )
    return cls.remote(cfg)
