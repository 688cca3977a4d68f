"""Free disk space, checked before a step writes many gigabytes.

A 7B model export or a checkpoint download that cannot fit fails at once, with RESOURCE_EXHAUSTED naming
the setting to change, instead of with ENOSPC after the training (hours of GPU) is done. The check is a
forecast, not a reservation: another writer on the same disk can still fill it.

Kubernetes complicates "free". An emptyDir with a ``sizeLimit`` sits on the node's disk, so ``statvfs``
shows the node's free space, while the kubelet evicts the pod once the volume holds more than the limit.
With ``size_limit`` set, the space left is the smaller of the disk's free space and the limit less what
the volume (the mount point that holds the path) already holds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dreamframe.errors import ResourceExhausted

GIB = 1 << 30
# Beyond a forecast: configs, tokenizer files, manifests, logs, filesystem rounding.
HEADROOM_BYTES = 256 << 20


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def existing_parent(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (a work directory not made yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_root(path: Path) -> Path:
    """The mount point of the filesystem ``path`` is on (the volume a size limit applies to)."""
    path = existing_parent(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def used_bytes(root: Path) -> int:
    """Bytes allocated to files under ``root``, as the kubelet counts an emptyDir (``du``); symlinks are
    not followed and each hard-linked file counts once."""
    total, seen = 0, set()
    stack = [Path(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # gone or unreadable since it was listed
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def free_bytes(path: Path, size_limit: int | None = None) -> int:
    """Bytes that can still be written at ``path``: the disk's free space, and under ``size_limit`` (the
    volume's limit) no more than the limit less what the volume holds."""
    free = shutil.disk_usage(existing_parent(path)).free
    if size_limit is not None:
        free = min(free, max(0, size_limit - used_bytes(mount_root(path))))
    return free


def require_free(path: Path, need: int, *, field: str, what: str, size_limit: int | None = None) -> None:
    """Raise ResourceExhausted naming ``field`` unless ``need`` bytes (plus a little headroom) fit at
    ``path``. ``what`` says what the bytes are for; the message never shows the server's paths."""
    if need <= 0:
        return
    free = free_bytes(path, size_limit)
    if need + HEADROOM_BYTES > free:
        limit = f" (the volume's size limit is {gib(size_limit)})" if size_limit is not None else ""
        raise ResourceExhausted(
            f"{what} needs about {gib(need + HEADROOM_BYTES)} of disk, but {gib(free)} is free{limit}: "
            f"free some space, or point {field} at a larger disk",
            field=field,
        )
