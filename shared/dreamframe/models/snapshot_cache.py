"""Where the random-weight snapshots live in the model cache, and how each is written there once.

The model modules find their snapshot here (``snapshot_dir``); the writers, which need those modules,
live in ``dreamframe.models.snapshots`` and are named here as ``module:function``, imported only when a
snapshot is written. A snapshot is ``<cache>/<name>-v<version>/``, built through ``build_once`` (temp
folder + atomic rename: processes sharing a cache never see half of one), after checking that the cache's
disk has room for it.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dreamframe.disk_space import require_free
from dreamframe.models import build_once

log = logging.getLogger(__name__)

SDXL_RANDOM = "sdxl-random"
LLAVA_7B_RANDOM = "llava-1.5-7b-random"
CLIP_L_RANDOM = "clip-vit-large-patch14-random"


@dataclass(frozen=True)
class Snapshot:
    name: str
    # Bump when a writer or config changes, so stale caches are rebuilt instead of reused.
    version: int
    # What writes it into a folder: ``module:function`` (imported when it is written) or the function.
    write: str | Callable[[Path], None]
    # A file that exists only in a complete snapshot.
    marker: str
    # Its weights' bytes (parameters × dtype; tests/test_models_snapshots.py counts them on the meta
    # device): a cache without the room fails before writing, naming models.cache_dir.
    size_bytes: int = 0

    def folder(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / f"{self.name}-v{self.version}"

    def writer(self) -> Callable[[Path], None]:
        if callable(self.write):
            return self.write
        module, _, function = self.write.partition(":")
        return getattr(importlib.import_module(module), function)


SNAPSHOTS: dict[str, Snapshot] = {
    SDXL_RANDOM: Snapshot(
        SDXL_RANDOM,
        1,
        "dreamframe.models.snapshots:write_sdxl_random",
        "refiner/model_index.json",
        size_bytes=13_013_000_000,
    ),
    LLAVA_7B_RANDOM: Snapshot(
        LLAVA_7B_RANDOM,
        1,
        "dreamframe.models.snapshots:write_llava_7b_random",
        "processor_config.json",
        size_bytes=14_127_000_000,
    ),
    CLIP_L_RANDOM: Snapshot(
        CLIP_L_RANDOM,
        1,
        "dreamframe.models.snapshots:write_clip_l_random",
        "preprocessor_config.json",
        size_bytes=608_000_000,
    ),
}


def snapshot_dir(name: str, cache_dir: Path) -> Path:
    """The snapshot's folder in the cache, written on first use (race-safe across processes)."""
    spec = SNAPSHOTS[name]

    def write(tmp: Path) -> None:
        require_free(tmp, spec.size_bytes, field="models.cache_dir", what=f"writing the {name} snapshot")
        started = time.monotonic()
        log.info("writing the %s snapshot (random weights) into %s", name, spec.folder(cache_dir))
        spec.writer()(tmp)
        log.info("wrote the %s snapshot in %.1f s", name, time.monotonic() - started)

    return build_once(
        spec.folder(cache_dir),
        write,
        complete=lambda target: (target / spec.marker).exists(),
        tmp_prefix=f".{name}-",
    )
