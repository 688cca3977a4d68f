"""Child processes we start and supervise (local services, training workers)."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def pid_running(pid: int) -> bool:
    """Alive and not a zombie: a process killed but not yet reaped holds no memory (GPU memory
    included), so it no longer counts. Without /proc (macOS) as ``pid_alive`` says."""
    if not pid_alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
