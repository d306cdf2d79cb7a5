"""Where the learned state lives: `REDIS_URL` (password and rediss:// URLs work), or a private
`redis-server` that draftpick starts itself.

The embedded server listens on a free loopback port (or another address, then with a password), keeps its data in its own directory with an
append-only file written with `appendfsync always` (an acknowledged write survives a kill), holds
a lock on that directory so that a second server cannot use it at the same time, and is stopped
when the process exits.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = "redis-server is not installed: `apt-get install redis-server` (Debian/Ubuntu), or set REDIS_URL"


class RedisUnavailable(RuntimeError):
    pass


def default_data_dir(service: str = "draftpick") -> Path:
    """Where a service's embedded Redis keeps its data (serve.name: each service its own)."""
    home = Path(os.environ.get("DRAFTPICK_HOME", Path.home() / ".cache" / "draftpick"))
    return home / ("redis" if service == "draftpick" else f"redis-{service}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class EmbeddedRedis:
    """A private redis-server (use as a context manager, or `start()` / `stop()`).

    host: the address it binds (default 127.0.0.1); any other needs a password. die_with_parent:
    the kernel stops the server when the process that started it dies (a killed Ray actor)."""

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None, host: str = "127.0.0.1",
                 password: str | None = None, die_with_parent: bool = False):
        if host != "127.0.0.1" and not password:
            raise ValueError(f"an embedded Redis on {host} (not loopback) needs a password")
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.port, self.host, self.password = port, host, password
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None
        self._lock = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisUnavailable(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_dir / "draftpick.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RedisUnavailable(f"another draftpick Redis server uses {self.data_dir} (locked); "
                                   "set REDIS_URL to share it, or give another data directory") from None
        self.port = self.port or free_port(self.host)
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--protected-mode", "yes", "--logfile", "redis.log", *auth],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.die_with_parent else None)
        atexit.register(self.stop)
        self._wait()
        return self

    def _wait(self, timeout: float = 10.0) -> None:
        import redis

        client = redis.Redis(host=self.host, port=self.port, password=self.password)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RedisUnavailable(f"redis-server did not start (see {self.data_dir / 'redis.log'})") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server flushes its append-only file and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def connect(url: str | None = None, data_dir: str | Path | None = None):
    """(client, embedded server or None): REDIS_URL (or `url`) if given, else an embedded server."""
    import redis

    url = url or os.environ.get("REDIS_URL")
    server = None
    if not url:
        server = EmbeddedRedis(data_dir).start()
        url = server.url
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as e:
        if server is not None:
            server.stop()
        raise RedisUnavailable(f"cannot reach Redis at {_redact(url)}: {e}") from None
    return client, server


def _redact(url: str) -> str:
    """A URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
