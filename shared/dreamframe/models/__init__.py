"""Model presets shared by services: ``tiny`` (random, built from configs in code, CPU seconds) and the
real ones (loaded from a local path or hub id with the same code). Nothing here downloads in tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_once(
    target: Path, build: Callable[[Path], object], *, complete: Callable[[Path], bool], tmp_prefix: str
) -> Path:
    """``target``, a folder built on first use: ``build(tmp)`` fills a temp folder beside it, which is
    then renamed into place. Concurrent processes (several replicas sharing a model cache) never see a
    half-written folder, and a crash leaves none behind. ``complete(target)`` says it is already there;
    when another process wins the race, its copy (identical: same seed and configs, or same files) is
    the one used."""
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        if not complete(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
