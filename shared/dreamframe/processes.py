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


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first, then the parent's pid);
    None without /proc or without the process. The name, in parentheses, may hold spaces."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def parent_pid(pid: int) -> int | None:
    """The parent's pid from /proc; None where /proc cannot tell."""
    fields = proc_stat(pid)
    return int(fields[1]) if fields else None


def pid_running(pid: int) -> bool:
    """Alive and not a zombie: a process killed but not yet reaped holds no memory (GPU memory
    included), so it no longer counts. Without /proc (macOS) as ``pid_alive`` says."""
    if not pid_alive(pid):
        return False
    fields = proc_stat(pid)
    return fields is None or fields[0] != "Z"
