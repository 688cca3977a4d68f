"""A fresh process for the compile-cache tests: compiles a tiny module (or the tiny renderer engine) through
``CompileCache`` and prints one JSON line with what happened (hit or miss, inductor's counters).

    python tests/compile_cache_child.py module|engine|engine-aot LOCAL_DIR [STORE_ROOT]

Storage: the S3 server in DREAMFRAME_STORAGE__* when set (backend s3), else a LocalStore at STORE_ROOT
(none: no store). The signing key comes from DREAMFRAME_TEST_CC_KEY. TORCHINDUCTOR_CACHE_DIR is the
caller's (a fresh one per process), so a hit can only come from the bundle.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


class Tiny(torch.nn.Module):
    """Defined here, not in torch.nn: dynamo skips frames of torch's own files (a bare Sequential's
    forward is never traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.gelu(self.a(x)) * 2 + 1)


def open_store(root: str | None):
    from dreamframe.config import load_settings
    from dreamframe.storage import LocalStore
    from dreamframe.storage import open_store as open_

    if os.environ.get("DREAMFRAME_STORAGE__BACKEND") == "s3":
        return open_(load_settings().storage)
    return LocalStore(Path(root), "dreamframe") if root else None


def main() -> None:
    from torch._dynamo.utils import counters

    from dreamframe.models.compile_cache import CompileCache, CompileCacheSettings

    what, local = sys.argv[1], sys.argv[2]
    store = open_store(sys.argv[3] if len(sys.argv) > 3 else None)
    settings = CompileCacheSettings(dir=Path(local), key=os.environ["DREAMFRAME_TEST_CC_KEY"], key_file=None)
    started = time.monotonic()
    out: dict = {}
    if what == "module":
        cache = CompileCache(settings, service="test", store=store)
        torch.manual_seed(0)
        module = Tiny()
        key = cache.key(model={"preset": "tiny-module"}, options={"mode": "default"}, workload={"batch": 2})
        session = cache.session(key)
        module.compile()
        with torch.no_grad():
            y = module(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)))
        session.finish()
        out["output"] = y.flatten().tolist()
        out["hit"] = session.hit
    else:
        from services.keyframe_renderer.engine import EngineOptions, load_engine
        from services.keyframe_renderer.options import RenderOptions, resolve_options

        cache = CompileCache(settings, service="keyframe-renderer", store=store)
        engine = load_engine(
            "tiny",
            model_paths={},
            cache_dir=Path(os.environ["DREAMFRAME_TEST_MODELS"]),
            device="cpu",
            options=EngineOptions(
                compile_mode="default", compile_vae=False, compile_aot=what == "engine-aot"
            ),
            compile_cache=cache,
        )
        params = resolve_options(
            RenderOptions(steps=2, width=64, height=64, disable_refiner=True, guidance_scale=1.0),
            preset="tiny",
            resolution=engine.resolution,
            default_batch_size=1,
            compile_default=True,
        )
        images = engine.render(["a cat"], [20], params)
        out["checksum"] = int(images.astype("int64").sum())
        out["hit"] = next(iter(engine._cache_sessions.values())).hit
        out["graphs_traced"] = int(counters["stats"]["unique_graphs"])
    out["seconds"] = time.monotonic() - started
    out["inductor"] = dict(counters["inductor"])
    out["aot_autograd"] = dict(counters["aot_autograd"])
    out["cache"] = cache.report()
    out["inductor_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
