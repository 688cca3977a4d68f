"""Renderer replica cold start → first frame, with and without the compile cache (one process per run).

    python -m services.keyframe_renderer.bench.cold_start --preset sdxl-random --no-cache   # compiles
    python -m services.keyframe_renderer.warm_cache --preset sdxl-random                   # fills the cache
    python -m services.keyframe_renderer.bench.cold_start --preset sdxl-random              # loads it

Does what a replica does before its first frame: read the settings, load the preset through the renderer's
normal loading (``load_engine``), compile with the renderer's settings, render one batch of the shape a
replica serves (batch size from settings or free memory, the preset's resolution, 40 steps, refiner) and
copy it to the host. Prints seconds since the process started (interpreter start included, from the
kernel's process start time) at each milestone: script started (``-m`` imports the bench package
first, so torch and diffusers are in by then), imports done, model loaded, first compiled batch (=
compile + first frame), and whether the compile cache hit. Inductor's own cache dir is a fresh temporary
folder each run (a pod on a new node): with ``--no-cache`` nothing is reused; with the cache, what is
reused comes from the signed bundle alone. ``--out FILE`` appends the JSON line to FILE.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def process_age() -> float:
    """Seconds since the kernel started this process (Linux), else since this module was imported."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start
    except (OSError, ValueError, IndexError):
        return time.monotonic() - STARTED


def parse(argv: list[str]) -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="default: renderer.preset")
    parser.add_argument("--no-cache", action="store_true", help="compile without the compile cache")
    parser.add_argument("--batch-size", type=int, default=None, help="default: renderer.batch_size")
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mode", default=None, help="compile mode (default: renderer.compile_mode)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--keep-inductor-dir", action="store_true", help="use TORCHINDUCTOR_CACHE_DIR as set")
    parser.add_argument("--out", type=Path, default=None)
    return vars(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not args["keep_inductor_dir"]:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cold-start-inductor-")
    marks: dict[str, float] = {"script_started": process_age() - (time.monotonic() - STARTED)}

    import torch
    from torch._dynamo.utils import counters

    from dreamframe.benchmarking import synchronize
    from dreamframe.config import get_settings
    from dreamframe.logging import configure_logging
    from dreamframe.models.compile_cache import CompileCache
    from dreamframe.storage import open_store

    from ..engine import renderer_compile_cache
    from ..warm_cache import load_uncompiled, shapes

    configure_logging()
    settings = get_settings()
    renderer = settings.renderer.model_copy(update={"compile": True})
    for name in ("preset", "device"):
        if args[name]:
            setattr(renderer, name, args[name])
    if args["mode"]:
        renderer.compile_mode = args["mode"]
    if args["no_cache"]:
        cache = CompileCache.disabled("keyframe-renderer")
    else:
        cache = renderer_compile_cache(renderer, open_store(settings.storage), settings.models.cache_dir)
    marks["imported"] = process_age()
    engine = load_uncompiled(renderer, settings, cache)
    synchronize(engine.device)
    marks["model_loaded"] = process_age()
    params, batch = shapes(engine, renderer, args["resolution"], args["steps"], args["batch_size"])
    engine.compile(renderer.compile_mode)
    images = engine.render(
        [f"generate an image in cold-start style: frame {i}" for i in range(batch)],
        [params.seed(i) for i in range(batch)],
        params,
    )
    marks["first_frame"] = process_age()
    session = next(iter(engine._cache_sessions.values()), None)
    result = {
        "preset": renderer.preset,
        "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        "compile_cache": "off" if args["no_cache"] else ("hit" if session and session.hit else "miss"),
        "compile_mode": engine.options.compile_mode,
        "batch_size": batch,
        "size": params.width,
        "steps": params.steps,
        "images": int(images.shape[0]),
        "seconds": {k: round(v, 2) for k, v in marks.items()},
        "load_seconds": round(marks["model_loaded"] - marks["imported"], 2),
        "compile_and_first_batch_seconds": round(marks["first_frame"] - marks["model_loaded"], 2),
        "cache": cache.report(),
        # What the start still traced (0 when every module's function came from the cache) and, with
        # compile_aot, how many functions were loaded or compiled ahead of time.
        "graphs_traced": int(counters["stats"]["unique_graphs"]),
        "compile_aot": engine.options.compile_aot,
        "aot_loaded": sum(r.loaded for r in engine._aot_runners),
        "aot_compiled": sum(r.compiled for r in engine._aot_runners),
        "torch": torch.__version__,
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args["out"] is not None:
        args["out"].parent.mkdir(parents=True, exist_ok=True)
        with args["out"].open("a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
