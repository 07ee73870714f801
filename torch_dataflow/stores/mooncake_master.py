"""Start and stop a ``mooncake_master`` the way its users do, on loopback by default.

The Mooncake store needs one master process per cluster. For one machine
(tests, examples, ``torch-dataflow mooncake-master``) this module starts the
``mooncake_master`` binary shipped by the Mooncake wheel, bound to
``127.0.0.1`` on free ports, waits until its RPC port accepts connections, and
stops it by process id.

Example:
    >>> from torch_dataflow.stores.mooncake_master import MooncakeMaster
    >>> with MooncakeMaster(lease_ttl_ms=200) as master:     # doctest: +SKIP
    ...     store = open_store(master.uri)                    # "mooncake://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import BackendUnavailable, ConfigError

__all__ = ["INSTALL_HINT", "MooncakeMaster", "find_master_binary", "free_port", "main"]

INSTALL_HINT = (
    "the Mooncake store needs the `mooncake` package and libibverbs: "
    "`pip install 'torch-dataflow[mooncake-cpu]'` (CPU-only machines and CI; the "
    "`mooncake-transfer-engine-non-cuda` wheel) or `pip install 'torch-dataflow[mooncake]'` "
    "(GPU nodes with the CUDA driver; the `mooncake-transfer-engine` wheel), "
    "plus `apt-get install -y libibverbs1`"
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_master_binary() -> str:
    """Path of the ``mooncake_master`` executable.

    Looks on ``PATH``, then beside the running interpreter (a virtualenv's
    ``bin/``), then inside the installed ``mooncake`` package.

    Raises:
        ConfigError: no binary found (the message says how to install one).
    """
    found = shutil.which("mooncake_master")
    if found:
        return found
    beside = Path(sys.executable).parent / "mooncake_master"
    if beside.exists():
        return str(beside)
    try:
        import importlib.util

        spec = importlib.util.find_spec("mooncake")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        packaged = Path(spec.origin).parent / "mooncake_master"
        if packaged.exists():
            return str(packaged)
    raise ConfigError(f"mooncake_master not found: {INSTALL_HINT}")


def _size(value: int | str) -> int:
    from ..uri import parse_size

    return parse_size(value)


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackendUnavailable(
                f"{Path(proc.args[0]).name} exited with code {proc.returncode} before listening on {port}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BackendUnavailable(f"mooncake_master did not listen on {host}:{port} within {timeout:.0f} s")


class MooncakeMaster:
    """A ``mooncake_master`` child process on loopback, stopped by its pid.

    Args:
        host: address to bind the RPC and metrics servers to (loopback by default).
        port: RPC port; ``0`` picks a free one.
        metrics_port: HTTP metrics port; ``0`` picks a free one.
        lease_ttl_ms: read-lease time of objects (``--default_kv_lease_ttl``);
            Mooncake's default is 10000. Tests use a short one.
        client_ttl_s: seconds a silent client stays alive (``--client_ttl``).
        extra_args: more ``--flag=value`` arguments, passed through.
        log_path: where the master writes stdout/stderr (default: discarded).
        startup_timeout: seconds to wait for the RPC port.
        segment_size: also start a store server (``mooncake_client``) that
            contributes this much memory (``"4GiB"``): clients with
            ``segment_size=0`` then keep their objects there, so samples outlive
            the process that wrote them. ``None``: master only.

    Example:
        >>> with MooncakeMaster() as m:                      # doctest: +SKIP
        ...     print(m.uri)
        mooncake://127.0.0.1:40123
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics_port: int = 0,
        lease_ttl_ms: int | None = None,
        client_ttl_s: int | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        segment_size: int | str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.lease_ttl_ms = lease_ttl_ms
        self.client_ttl_s = client_ttl_s
        self.extra_args = tuple(extra_args)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.segment_size = None if segment_size is None else _size(segment_size)
        self.server_port = free_port(host) if self.segment_size else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the RPC server (what clients call the master address)."""
        return f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        """A store URI for this master: ``mooncake://host:port``."""
        return f"mooncake://{self.address}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def command(self) -> list[str]:
        """The command line that starts this master."""
        cmd = [
            find_master_binary(),
            f"--rpc_address={self.host}",
            f"--rpc_port={self.port}",
            f"--metrics_host={self.host}",
            f"--metrics_port={self.metrics_port}",
        ]
        if self.lease_ttl_ms is not None:
            cmd.append(f"--default_kv_lease_ttl={int(self.lease_ttl_ms)}")
        if self.client_ttl_s is not None:
            cmd.append(f"--client_ttl={int(self.client_ttl_s)}")
        return cmd + list(self.extra_args)

    def server_command(self) -> list[str]:
        """The command line of the store server (``mooncake_client``) holding the segment."""
        binary = str(Path(find_master_binary()).with_name("mooncake_client"))
        if not Path(binary).exists():
            binary = shutil.which("mooncake_client") or "mooncake_client"
        return [
            binary,
            f"--global_segment_size={self.segment_size}",
            "--local_buffer_size=0",
            f"--host={self.host}",
            f"--port={self.server_port}",
            f"--master_server_address={self.address}",
            "--metadata_server=P2PHANDSHAKE",
            "--protocol=tcp",
        ]

    def start(self) -> MooncakeMaster:
        """Start the master (and store server) and wait until they accept connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        try:
            self.proc = self._spawn(self.command())
            _wait_port(self.host, self.port, self.proc, self.startup_timeout)
            if self.segment_size:
                assert self.server_port is not None
                self.server = self._spawn(self.server_command())
                # It listens only after its segment is mounted on the master.
                _wait_port(self.host, self.server_port, self.server, self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            # Own session: a shell job or a test runner's process group being
            # torn down must not take the server with it mid-run (measured).
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the store server and the master by their pids: SIGTERM, then SIGKILL."""
        for attr in ("server", "proc"):
            proc = getattr(self, attr)
            setattr(self, attr, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def __enter__(self) -> MooncakeMaster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.proc is not None else "stopped"
        return f"MooncakeMaster({self.address!r}, {state})"


def main(argv: Sequence[str] | None = None) -> int:
    """``torch-dataflow mooncake-master``: run a master in the foreground until Ctrl-C.

    Example:
        ``torch-dataflow mooncake-master --port 50051 --lease-ttl-ms 5000``
    """
    p = argparse.ArgumentParser(
        prog="torch-dataflow mooncake-master", description="Run a Mooncake master in the foreground until Ctrl-C.",
        epilog="example: torch-dataflow mooncake-master --port 50051 --lease-ttl-ms 5000")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=50051, help="RPC port (0: pick a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="HTTP metrics port (0: pick a free one)")
    p.add_argument("--lease-ttl-ms", type=int, default=None, help="object read-lease TTL (Mooncake default 10000)")
    p.add_argument("--client-ttl-s", type=int, default=None, help="seconds before a silent client is dropped")
    p.add_argument("--segment-size", default=None, help="also start a store server holding this much (e.g. 4GiB)")
    p.add_argument("extra", nargs="*", help="more mooncake_master flags, e.g. --eviction_high_watermark_ratio=0.95")
    args = p.parse_args(argv)
    master = MooncakeMaster(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        lease_ttl_ms=args.lease_ttl_ms,
        client_ttl_s=args.client_ttl_s,
        extra_args=args.extra,
        segment_size=args.segment_size,
    )
    def _terminate(signum: int, frame: Any) -> None:  # kill/timeout/systemd stop: stop the children too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:  # from here on, Ctrl-C and SIGTERM stop whatever was started
        try:
            master.start()
        except (ConfigError, BackendUnavailable) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        served = f"; store server pid {master.server.pid} holds {master.segment_size} bytes" if master.server else ""
        print(f"mooncake_master pid {master.pid} listening{served}; store URI: {master.uri}", flush=True)
        assert master.proc is not None
        return master.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        master.stop()


if __name__ == "__main__":
    sys.exit(main())
