"""Start and stop a ``redis-server`` the way its users do, on loopback by default.

For tests, benchmarks and examples: the Debian ``redis-server`` binary, bound to
one address on a free port, with the persistence the caller asks for (none, or
AOF with ``appendfsync always``), stopped by its process id.

Example:
    >>> from torch_dataflow.ledger.redis_server import RedisServer
    >>> with RedisServer() as srv:                               # doctest: +SKIP
    ...     led = open_ledger(srv.uri + "?namespace=run1")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from ..errors import BackendUnavailable, ConfigError

__all__ = ["INSTALL_HINT", "RedisServer", "free_port"]

INSTALL_HINT = "the Redis ledger tests need redis-server: `apt-get install -y redis-server` (or `make sysdeps`)"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process.

    Args:
        host: address to bind (``127.0.0.1``; another address only on purpose).
        port: TCP port (``None``: a free one, kept across :meth:`restart`).
        aof: append-only file in ``dir`` (else no persistence).
        appendfsync: the AOF's fsync policy, ``always`` (default: every write is on disk before the
            reply) or ``everysec`` (at most about a second of writes lost in a host crash).
        dir: working directory for the AOF (a temporary one by default).
        password: ``requirepass`` for the server.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *, aof: bool = False,
                 dir: str | None = None, password: str | None = None, appendfsync: str = "always") -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ConfigError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        self.appendfsync = appendfsync
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise ConfigError(INSTALL_HINT)
        self.host, self.port = host, port or free_port(host)
        self.aof, self.password = aof, password
        self.dir = dir or tempfile.mkdtemp(prefix="td-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and wait until it answers ``PING`` (AOF loaded)."""
        args = [self.binary, "--bind", self.host, "--port", str(self.port), "--dir", self.dir, "--save", "",
                "--daemonize", "no", "--protected-mode", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        assert self.binary is not None
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendUnavailable(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise BackendUnavailable(f"redis-server on {self.host}:{self.port} did not answer within {timeout}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop the server by its pid (``SIGTERM``: clean shutdown; ``SIGKILL``: a crash)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, sig: int = signal.SIGTERM) -> RedisServer:
        """Stop (with ``sig``) and start again on the same port and directory."""
        self.stop(sig)
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
