"""The controller as a Ray actor, and the client workers decide through.

`start_controller(cfg, description, redis_url)` starts (or finds) the service's actor, named
`<serve.name>_controller` (`draftpick_controller` by default) in the Ray namespace `draftpick`:
detached, so it does not die with the process that created it (a Serve replica, a driver), and
restarted by Ray when it dies (`max_restarts=-1`); whoever starts it stops it on shutdown
(`stop_controller`). The actor folds feedback in a background thread and answers `decide`, `stats`
and `status`. Services with other names run side by side on one cluster, each with its own
controller and embedded Redis.

`DecisionClient` is what a worker holds: it asks the actor, and when the actor cannot answer in
time it decides with the same policy over its own snapshot of the statistics in Redis, so requests
never wait on the controller; feedback goes to Redis through the worker's sink either way.
"""
from __future__ import annotations

import logging
import threading
import time

import ray

from draftpick.controller.controller import Controller, Plan
from draftpick.policies.types import Context

log = logging.getLogger(__name__)
NAMESPACE = "draftpick"


def actor_name(service: str = "draftpick") -> str:
    """The controller actor of the service named `service` (serve.name)."""
    return f"{service}_controller"


NAME = actor_name()  # the default service's actor


def _controller(cfg, description: dict, redis_url: str, consumer: str | None = None) -> Controller:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    return Controller(client, cfg.build_policy(), description, {d.name for d in cfg.drafters}, cfg.engine.max_k,
                      consumer=consumer)


class ControllerActor:
    def __init__(self, cfg, description: dict, redis_url: str | None, fold_block_ms: int = 500,
                 redis_port: int | None = None, redis_password: str | None = None):
        """redis_url None: start the service's embedded Redis on this node (its address, the given
        port and password, the service's directory; stopped with the actor, restarted with it on the
        same address)."""
        self.redis_server = None
        if redis_url is None:
            self.redis_server = _embedded_redis(redis_port, redis_password, cfg.serve.name)
            redis_url = self.redis_server.url
        self._redis_url = redis_url
        self.controller = _controller(cfg, description, redis_url,
                                      consumer=f"{actor_name(cfg.serve.name)}-{int(time.time() * 1000)}")
        self.folded, self.fold_error = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fold_loop, args=(fold_block_ms,), daemon=True)
        self._thread.start()

    def _fold_loop(self, block_ms: int) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.folded += self.controller.fold_pending(block_ms=block_ms)
                self.fold_error, backoff = None, 0.1
            except Exception as e:  # Redis down: retry with backoff; decisions go on from the last snapshot
                self.fold_error = f"{type(e).__name__}: {e}"
                time.sleep(backoff)
                backoff = min(2 * backoff, 5.0)

    def decide(self, context: Context) -> Plan:
        return self.controller.decide(context)  # a round-level worker's rounds choose from its own snapshot

    def stats(self) -> dict:
        return self.controller.stats()

    def status(self) -> dict:
        return {**self.controller.status(), "folded": self.folded, "fold_error": self.fold_error,
                "snapshot_error": self.controller.redis_error}

    def redis_url(self) -> str:
        return self._redis_url

    def stop(self) -> None:
        """Stop folding in the background, fold what is left, then stop the embedded Redis (if any)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.folded += self.controller.fold_pending()
        except Exception as e:  # Redis down: the entries stay in the stream for the next controller
            log.warning("draftpick: final fold failed: %s", e)
        if self.redis_server is not None:
            self.redis_server.stop()


def _embedded_redis(port: int | None, password: str | None, service: str, wait_s: float = 15.0):
    """The service's embedded Redis on this Ray node's address. After a restart of the actor the
    previous server may still be flushing on the port for a moment: retry until it is free."""
    from draftpick.controller.redis_server import EmbeddedRedis, RedisUnavailable, default_data_dir

    host = ray.util.get_node_ip_address()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return EmbeddedRedis(default_data_dir(service), port=port, host=host, password=password,
                                 die_with_parent=True).start()
        except RedisUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def start_controller(cfg, description: dict, redis_url: str | None):
    """The service's named, detached controller actor (an existing one is reused). redis_url None:
    the actor starts the embedded Redis on its node (`ray.get(actor.redis_url.remote())` says where)."""
    import secrets

    from draftpick.controller.redis_server import free_port

    cls = ray.remote(ControllerActor).options(
        name=actor_name(cfg.serve.name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1,
        max_task_retries=-1, num_cpus=0, max_concurrency=16)
    if redis_url:
        return cls.remote(cfg, description, redis_url)
    return cls.remote(cfg, description, None, redis_port=free_port(), redis_password=secrets.token_hex(16))


def service_redis_url(cfg, description: dict, redis_url: str | None = None) -> str:
    """Start (or find) the controller actor and return the Redis URL the service uses: redis_url,
    else $REDIS_URL, else the controller's embedded server."""
    import os

    redis_url = redis_url or os.environ.get("REDIS_URL") or None
    actor = start_controller(cfg, description, redis_url)
    return redis_url or ray.get(actor.redis_url.remote(), timeout=60)


def stop_controller(service: str = "draftpick") -> bool:
    """Stop the service's controller actor if it runs; returns whether one was stopped."""
    try:
        actor = ray.get_actor(actor_name(service), namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=10)
    except Exception:  # already dying: kill it all the same
        pass
    ray.kill(actor, no_restart=True)
    return True


class DecisionClient:
    """Decisions for a worker: from the controller actor, else (it is down or slow) from the same
    policy over this worker's own snapshot of the learned state."""

    def __init__(self, cfg, description: dict, redis_url: str, timeout_s: float = 0.5):
        self.local = _controller(cfg, description, redis_url)
        self.name = actor_name(cfg.serve.name)
        self.timeout_s = timeout_s
        self.fallbacks = 0
        self.controller_error: str | None = None
        self._actor = None  # the actor's handle, looked up once (again after a failure)

    def _handle(self):
        if not ray.is_initialized():  # no Ray here, so no actor (and no Ray started by asking)
            raise RuntimeError("Ray is not initialized")
        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
        return self._actor

    def _fallback(self, context: Context, e: Exception) -> Plan:
        """No actor, dead, restarting or slow: decide here."""
        self._actor = None
        self.fallbacks += 1
        self.controller_error = f"{type(e).__name__}: {e}"
        return self.local.decide(context)

    def decide(self, context: Context) -> Plan:
        try:
            plan = ray.get(self._handle().decide.remote(context), timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001
            return self._fallback(context, e)
        self.controller_error = None
        return plan

    async def decide_async(self, context: Context) -> Plan:
        """decide() without blocking the caller's event loop while the actor answers (a worker's
        loop starts every step: a blocking call there stalls every request in flight)."""
        import asyncio

        try:
            plan = await asyncio.wait_for(self._handle().decide.remote(context), timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001
            return self._fallback(context, e)
        self.controller_error = None
        return plan

    def status(self) -> dict:
        return {"controller": "up" if self.controller_error is None else f"down: {self.controller_error}",
                "local_decisions": self.fallbacks, **self.local.status()}
