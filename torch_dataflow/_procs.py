"""Whether a process still runs (shared by the ledger's heartbeats and the file store's sweep).

Example:
    >>> import os, socket
    >>> pid_gone(socket.gethostname(), os.getpid())
    False
"""

from __future__ import annotations

import os
import socket

__all__ = ["pid_gone"]


def pid_gone(host: str | None, pid: int | None) -> bool:
    """True only when ``pid`` provably no longer runs: same host and no such process."""
    if host != socket.gethostname() or not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
