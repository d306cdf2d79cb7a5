"""Ray Serve: `build_app(config, redis_url) -> Application` and `draftpick serve`.

This first version is one deployment that hosts the engine and the OpenAI ingress together
(deploy.ingress). The engine's replica attaches the feedback sink and decides unpinned requests
through the controller actor (controller.actor), which it starts if none runs; that actor folds
the feedback. Separate ingress and worker deployments, replicas and autoscaling, Prometheus metrics,
authentication, back-pressure and the cluster rehearsal are still to come (issue 17).
"""

import os
import signal
import sys
import threading

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray loads: a local Ray as one loopback node

from fastapi import Request  # noqa: E402
from ray import serve  # noqa: E402

from draftpick.deploy import ingress

api = ingress.new_app()


class _ServiceLearning:
    """Decisions for the replica: the controller actor, else the same policy over its own snapshot."""

    def __init__(self, cfg, engine, redis_url: str):
        from draftpick.controller.actor import DecisionClient, start_controller
        from draftpick.controller.controller import describe
        self.description = describe(cfg, engine)
        start_controller(cfg, self.description, redis_url)
        self.decisions = DecisionClient(cfg, self.description, redis_url)
        self.sink = self.decisions.local.sink()
        engine.add_sink(self.sink)

    def context(self, item, ids, temperature):
        from draftpick.controller.local import request_context

        return request_context(item, ids, temperature)

    def decide(self, context):
        return self.decisions.decide(context)

    def chooser(self, plan, context):
        return self.decisions.local.chooser(plan, context)

    def status(self) -> dict:
        return {**self.decisions.status(), "feedback": self.sink.status()}

    def stats(self) -> dict:
        return self.decisions.local.stats()


@serve.deployment
@serve.ingress(api)
class DraftpickServer:
    def __init__(self, cfg, redis_url: str | None = None, max_tokens_limit: int = 2048):
        from draftpick.workers.factory import build_engine
        from draftpick.workers.models import set_threads

        set_threads(cfg.worker.torch_threads)
        engine = build_engine(cfg)
        learning = _ServiceLearning(cfg, engine, redis_url) if redis_url else None
        self.backend = ingress.EngineBackend(cfg, engine, learning, max_tokens_limit)

    @api.get("/health")
    def health(self):
        return ingress.health(self.backend)

    @api.get("/v1/models")
    def models(self):
        return ingress.models(self.backend)

    @api.get("/v1/draftpick/stats")
    def draftpick_stats(self, request: Request):
        return ingress.stats(self.backend, request)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await ingress.handle(self.backend, request, "completion")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await ingress.handle(self.backend, request, "chat")


def build_app(cfg, redis_url: str | None = None):
    """The Serve application of a configuration (a DraftpickConfig, or a path / None: the embedded
    default); with a redis_url the service learns live."""
    from draftpick.workers.config import load_config

    if cfg is None or isinstance(cfg, (str, os.PathLike)):
        cfg = load_config(cfg)
    w = cfg.worker
    threads = str(w.torch_threads)
    return DraftpickServer.options(
        ray_actor_options={"num_cpus": w.num_cpus, "num_gpus": w.num_gpus,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}},
        max_ongoing_requests=w.max_concurrency,
    ).bind(cfg, redis_url)


def run_service(config_path: str | None, host: str, port: int, ready=None) -> None:
    """`draftpick serve`: Ray (RAY_ADDRESS or a local one on loopback), Redis (REDIS_URL or the
    embedded server), the app; until SIGINT or SIGTERM, then everything it started is stopped."""
    import ray

    from draftpick.controller.actor import stop_controller
    from draftpick.controller.redis_server import connect
    from draftpick.workers.config import load_config

    cfg = load_config(config_path)
    _, redis_server = connect()  # REDIS_URL (checked), else the embedded server
    redis_url = os.environ.get("REDIS_URL") or redis_server.url  # the actor and replicas connect to the same
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg, redis_url), name="draftpick", route_prefix="/")
        print(f"draftpick serving {cfg.target.name} at http://{host}:{port}/v1", flush=True)
        print(f"ray address: {ray.get_runtime_context().gcs_address}", flush=True)
        if ready is not None:
            ready()
        stop.wait()
    finally:
        print("draftpick: shutting down", file=sys.stderr, flush=True)
        try:  # each step bounded: a cluster that is already going away must not hold the shutdown
            _bounded(stop_controller, 20)
            _bounded(serve.shutdown, 40)
        finally:
            ray.shutdown()
            if redis_server is not None:
                redis_server.stop()


def _bounded(fn, seconds: float) -> None:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        print(f"draftpick: {getattr(fn, '__name__', fn)} did not finish in {seconds:.0f} s; going on", file=sys.stderr)
