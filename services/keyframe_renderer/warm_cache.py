"""Fill the renderer's compile cache once, so replicas start without compiling.

    python -m services.keyframe_renderer.warm_cache                      # the renderer's settings
    python -m services.keyframe_renderer.warm_cache --try-max-autotune   # also time max-autotune
    make warm-cache                                                      # the same, PRESET=... ARGS=...

Loads the renderer's preset the way a replica does (``load_engine``: presets, snapshot folders,
``model_paths``), compiles it with the renderer's settings on the shapes a replica serves (its batch size
— from free memory when 0, as the service chooses — and the preset's resolution, guidance and refiner as
the reference runs them), renders ``--batches`` timed batches after the one that compiles, and stores the
signed artifacts (dreamframe.models.compile_cache) on the model-cache volume and in the object store.
With ``--try-max-autotune`` the same again in max-autotune; the faster mode is recorded beside the
artifacts and a renderer configured with ``compile_mode: auto`` uses it. Prints one JSON report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from dreamframe import commandline
from dreamframe.errors import described

app = typer.Typer(add_completion=False)
log = logging.getLogger(__name__)


@app.command(help=__doc__.split("\n\n")[0])
def warm_cache(
    preset: Annotated[str | None, typer.Option(help="default: renderer.preset")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="default: renderer.batch_size (0: from free memory)")
    ] = None,
    resolution: Annotated[int, typer.Option(help="0: the preset's")] = 0,
    steps: Annotated[int, typer.Option(help="denoising steps per batch (shapes do not depend on it)")] = 40,
    batches: Annotated[int, typer.Option(help="timed batches per mode after the compiling one")] = 1,
    try_max_autotune: Annotated[
        bool, typer.Option("--try-max-autotune", help="also compile in max-autotune; keep the faster")
    ] = False,
    mode: Annotated[
        list[str] | None, typer.Option(help="compile modes to try (default: the configured one)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="default: renderer.device")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the JSON report here")] = None,
) -> dict[str, Any]:
    return run(
        preset=preset,
        batch_size=batch_size,
        resolution=resolution,
        steps=steps,
        batches=batches,
        modes=list(mode or []) + (["max-autotune"] if try_max_autotune else []),
        device=device,
        out=out,
    )


def run(
    *,
    preset: str | None = None,
    batch_size: int | None = None,
    resolution: int = 0,
    steps: int = 40,
    batches: int = 1,
    modes: list[str] | None = None,
    device: str | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    from dreamframe.config import get_settings
    from dreamframe.storage import open_store

    from .engine import AUTO_FALLBACK_MODE, renderer_compile_cache

    began = time.monotonic()
    settings = get_settings()
    renderer = settings.renderer.model_copy(update={"compile": True})
    if preset:
        renderer.preset = preset
    if device:
        renderer.device = device
    cache = renderer_compile_cache(renderer, open_store(settings.storage), settings.models.cache_dir)
    if not cache.enabled:
        raise SystemExit("warm-cache: the compile cache is off (no signing key, or it is disabled)")
    configured = renderer.compile_mode if renderer.compile_mode != "auto" else AUTO_FALLBACK_MODE
    tried = list(dict.fromkeys([configured, *(modes or [])]))
    engine = load_uncompiled(renderer, settings, cache)
    loaded = time.monotonic() - began
    params, batch = shapes(engine, renderer, resolution, steps, batch_size)
    report: dict[str, Any] = {
        "preset": renderer.preset,
        "device": str(engine.device),
        "batch_size": batch,
        "size": [params.width, params.height],
        "steps": params.steps,
        "load_seconds": loaded,
        "modes": {},
    }
    for compile_mode in tried:
        report["modes"][compile_mode] = time_mode(engine, compile_mode, params, batch, batches)
        print(json.dumps({compile_mode: report["modes"][compile_mode]}), flush=True)
    timed = {m: r["seconds_per_image"] for m, r in report["modes"].items() if "seconds_per_image" in r}
    if timed:
        best = min(timed, key=timed.__getitem__)
        engine.configure(dataclasses.replace(engine.options, compile_mode=""))
        cache.record_choice(
            engine.choice_key(),
            {"mode": best, "seconds_per_image": timed, "batch_size": batch, "size": params.width},
        )
        report["best_mode"] = best
    report["cache"] = cache.report()
    report["seconds"] = time.monotonic() - began
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return report


def load_uncompiled(renderer, settings, cache):
    """The renderer's engine as a replica loads it (presets, snapshot folders, model_paths), with the
    compile cache attached and not compiled yet: the caller compiles and times it."""
    from .engine import EngineOptions, load_engine

    return load_engine(
        renderer.preset,
        model_paths=renderer.model_paths,
        cache_dir=settings.models.cache_dir,
        device=renderer.device,
        options=EngineOptions.from_settings(renderer, compile=False),
        compile_cache=cache,
    )


def shapes(engine, renderer, resolution: int, steps: int, batch_size: int | None):
    """The render params and batch size a replica uses by default (what the artifacts are keyed by)."""
    from .options import RenderOptions, resolve_options

    size = resolution or engine.resolution
    params = resolve_options(
        RenderOptions(steps=steps, width=size, height=size),
        preset=renderer.preset,
        resolution=engine.resolution,
        default_batch_size=renderer.batch_size if batch_size is None else batch_size,
        compile_default=True,
    )
    batch = params.batch_size or engine.auto_batch_size(
        params, max_batch=renderer.max_batch_size, cpu_batch=renderer.cpu_batch_size
    )
    return params, batch


def time_mode(engine, mode: str, params, batch: int, batches: int) -> dict[str, Any]:
    """Compile in ``mode`` (or load it from the cache), then time ``batches`` batches."""
    from dreamframe.benchmarking import synchronize

    engine.configure(dataclasses.replace(engine.options, compile_mode=mode))
    prompts = [f"generate an image in warm-up style: frame {i}" for i in range(batch)]
    seeds = [params.seed(i) for i in range(batch)]
    try:
        started = time.monotonic()
        engine.render(prompts, seeds, params)
        synchronize(engine.device)
        first = time.monotonic() - started
        session = next(iter(engine._cache_sessions.values()), None)
        started = time.monotonic()
        for _ in range(batches):
            engine.render(prompts, seeds, params)
        synchronize(engine.device)
        seconds = time.monotonic() - started
    except Exception as exc:  # one mode failing (a kernel, a compile) must not lose the others
        log.exception("mode %s failed", mode)
        return {"error": described(exc)[:2000]}
    return {
        "first_batch_seconds": first,
        "cache_hit": bool(session and session.hit),
        "seconds_per_image": seconds / (batches * batch) if batches else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dreamframe.logging import configure_logging

    configure_logging()
    return commandline.run(app, argv)


if __name__ == "__main__":
    main()
