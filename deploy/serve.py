"""Ray Serve: the application builder `build_app` and `draftpick serve`.

Two deployments: `DraftpickIngress` (FastAPI, deploy.ingress: auth, parsing, tokenisation and the
chat template, responses, metrics; light, no CPU share) calls `DraftpickWorker` (workers.actor's
EngineWorker: target + drafters, decisions and feedback; the CPU/GPU shares, replicas or
autoscaling of the configuration's `worker` section) through a streaming Serve handle. The first
worker replica starts the controller actor (controller.actor), which also starts the embedded Redis
on its node unless the service is given a Redis URL ($REDIS_URL or the builder's `redis_url`).

`build_app` is what `import_path` names in a Serve config (deploy/serve.yaml: `serve run`,
`serve deploy`); `draftpick serve` runs the same application.
"""

import os
import signal
import sys
import threading
from functools import partial

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray loads: a local Ray as one loopback node

from ray import serve  # noqa: E402

from draftpick.workers.actor import EngineWorker, GenerateRequest, actor_resources  # noqa: E402

GRACEFUL_SHUTDOWN_S = 15  # in-flight requests get this long to end when a replica stops
DRAIN_S = 30  # on SIGINT / SIGTERM, admitted requests get this long to end before Serve stops


def _replica_grpc_on_node_address() -> None:
    """Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on [::]:0, all
    interfaces, whatever Ray's node address; bind it to the node's address instead (loopback for the
    embedded default). Each replica calls this in its constructor, which runs before that server
    starts (a test checks that the running service listens on loopback only)."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "draftpick", False):
        return

    def on_node_address(server, address):
        if address == "[::]:0":
            import ray

            address = f"{ray.util.get_node_ip_address()}:0"
        return original(server, address)

    on_node_address.draftpick = True
    replica.add_port_to_grpc_server = on_node_address


class ServeBackend:
    """The worker deployment behind the ingress, through its handle (deploy.ingress.LocalBackend's twin)."""

    def __init__(self, handle):
        self.handle = handle

    async def limits(self) -> dict:
        return await self.handle.limits.remote()

    async def stream(self, req: GenerateRequest):
        gen = self.handle.options(stream=True).generate_stream.remote(req)
        try:
            async for event in gen:
                yield event
        finally:  # closed early (the client went away): the worker's generation is cancelled
            gen.cancel()

    async def status(self) -> dict:
        return await self.handle.status.remote()

    async def stats(self) -> dict | None:
        return await self.handle.stats.remote()


@serve.deployment
class DraftpickWorker(EngineWorker):
    """Target and drafters in one replica; learns live (see EngineWorker with start_controller)."""

    def __init__(self, cfg, redis_url: str | None = None, learn: bool = True):
        _replica_grpc_on_node_address()
        super().__init__(cfg, redis_url if learn else None, start_controller=learn)

    def __del__(self):  # Serve calls it when the replica stops, after in-flight requests drained
        self.close()


@serve.deployment
@serve.ingress()
class DraftpickIngress:
    def __init__(self, cfg, worker):
        _replica_grpc_on_node_address()
        from draftpick.deploy.ingress import Ingress
        from draftpick.workers.models import load_tokenizer

        self.ingress = Ingress(cfg, ServeBackend(worker), load_tokenizer(cfg.target.path, cfg.target.gguf_file))

    def drain(self) -> tuple[str, int]:
        """Refuse new requests from now on; (this replica, requests it still has admitted)."""
        self.ingress.draining = True
        return serve.get_replica_context().replica_id.unique_id, self.ingress.admitted

    def __serve_build_asgi_app__(self):
        from draftpick.deploy.ingress import make_app

        return make_app(self.ingress)


def build_app(args=None):
    """The Serve application. args: a DraftpickConfig, or the `args` of a Serve config: {"config":
    a YAML file (default: the embedded default), "redis_url": where to learn (default: $REDIS_URL,
    else the controller's embedded Redis), "learn": false to serve without Redis}."""
    from draftpick.workers.config import DraftpickConfig, load_config

    args = {"config": args} if isinstance(args, DraftpickConfig) or args is None else dict(args)
    unknown = set(args) - {"config", "redis_url", "learn"}
    if unknown:
        raise ValueError(f"build_app: unknown args {', '.join(sorted(unknown))} (config, redis_url, learn)")
    cfg = args.get("config")
    if not isinstance(cfg, DraftpickConfig):
        cfg = load_config(cfg)
    learn = bool(args.get("learn", True))
    w = cfg.worker
    scaling = ({"autoscaling_config": w.autoscaling.model_dump()} if w.autoscaling else {"num_replicas": w.replicas})
    worker = DraftpickWorker.options(
        ray_actor_options=actor_resources(w), max_ongoing_requests=w.max_concurrency,
        max_queued_requests=cfg.serve.max_queued, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S, **scaling,
    ).bind(cfg, args.get("redis_url"), learn)
    return DraftpickIngress.options(
        num_replicas=cfg.serve.ingress_replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    ).bind(cfg, worker)


def run_service(config_path: str | None, host: str | None = None, port: int | None = None, ready=None) -> None:
    """`draftpick serve`: Ray (RAY_ADDRESS or a local one on loopback), the app (learning in REDIS_URL,
    else in the controller's embedded Redis); until SIGINT or SIGTERM, then everything it started is
    stopped: the controller (and its Redis), Serve (in-flight streams drain), Ray. ready: called with
    the base URL and a function that stops the service, once it serves (`draftpick demo`)."""
    import ray

    from draftpick.controller.actor import stop_controller
    from draftpick.controller.redis_server import connect
    from draftpick.workers.config import load_config

    cfg = load_config(config_path)
    host, port = host or cfg.serve.host, port or cfg.serve.port
    cfg.serve.resolved_api_key()  # `env:NAME` without the variable fails here
    if os.environ.get("REDIS_URL"):
        connect()  # a wrong REDIS_URL fails here, before Ray starts
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name=cfg.serve.name, route_prefix="/")
        print(f"draftpick serving {cfg.target.name} at http://{host}:{port}/v1", flush=True)
        print(f"ray address: {ray.get_runtime_context().gcs_address}", flush=True)
        if ready is not None:  # e.g. `draftpick demo`: ask, print, then stop
            ready(f"http://{host}:{port}", stop.set)
        stop.wait()
    finally:
        print("draftpick: shutting down", file=sys.stderr, flush=True)
        try:  # each step bounded: a cluster that is already going away must not hold the shutdown
            _bounded(partial(drain, cfg.serve.ingress_replicas, cfg.serve.name), DRAIN_S + 5)  # streams end first
            _bounded(serve.shutdown, 40)  # streams drain, replicas append their feedback
            _bounded(partial(stop_controller, cfg.serve.name), 20)  # folds what is left, stops its Redis
        finally:
            ray.shutdown()


def drain(replicas: int, app: str = "draftpick", timeout_s: float = None) -> bool:
    """Stop the ingress replicas admitting requests and wait (at most timeout_s, default DRAIN_S)
    until those admitted have ended; Serve's shutdown would otherwise cut streams mid-way, as its
    proxy stops with the replicas. Returns whether all ended in time."""
    import time

    handle = serve.get_deployment_handle("DraftpickIngress", app_name=app)
    deadline = time.monotonic() + (DRAIN_S if timeout_s is None else timeout_s)
    admitted: dict[str, int] = {}
    while time.monotonic() < deadline:
        replica, n = handle.drain.remote().result(timeout_s=5)  # reaches a replica at random
        admitted[replica] = n
        if len(admitted) >= replicas and not any(admitted.values()):
            return True
        time.sleep(0.2)
    print(f"draftpick: {sum(admitted.values())} requests still running after {DRAIN_S} s; stopping anyway",
          file=sys.stderr)
    return False


def _bounded(fn, seconds: float) -> None:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        name = getattr(getattr(fn, "func", fn), "__name__", fn)  # a partial names its function
        print(f"draftpick: {name} did not finish in {seconds:.0f} s; going on", file=sys.stderr)
