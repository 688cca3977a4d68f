"""The service end to end: ``Renderer.render`` of a benchmark story into a LocalStore (batched engine, PNG
and sidecar writes), one warm-up batch that pays any compile, then every frame timed, with device time
per stage, host synchronisations and peak memory."""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamframe import keys
from dreamframe.benchmarking import SyncCounter, synchronize
from dreamframe.storage.base import ObjectRef

from ..engine import SDXLEngine
from ..options import FrameSelection, RenderOptions
from ..renderer import Renderer, RenderRequest
from ..settings import RendererSettings
from .common import bench_story, note

Render = Callable[[str, FrameSelection], list]


def run_service(
    engine: SDXLEngine, *, frames: int, steps: int, size: int, fraction: float, batch_size: int, compile: bool
) -> dict[str, Any]:
    """``Renderer.render`` end to end into a LocalStore: warm-up batch, then ``frames`` timed frames."""
    from dreamframe.storage import LocalStore

    with tempfile.TemporaryDirectory(prefix="render-bench-") as tmp:
        store = LocalStore(Path(tmp), "bench")
        renderer = Renderer(store, RendererSettings(preset=engine.pipes.preset, device=str(engine.device)))
        renderer.engines.put(engine.pipes.preset, engine)
        ref: ObjectRef = store.put_bytes(keys.story_key("bench"), bench_story(frames).to_json().encode())
        options = RenderOptions(
            preset=engine.pipes.preset,
            steps=steps,
            high_noise_fraction=fraction,
            width=size,
            height=size,
            batch_size=batch_size,
            compile=compile,
        )

        def render(job: str, selection: FrameSelection):
            return list(
                renderer.render(RenderRequest(job_id=job, story=ref, frames=selection, options=options))
            )

        chosen, warmup_seconds = warm_up(render, frames, batch_size)
        result = timed(engine, render, chosen, warmup_seconds)
        renderer.close()
        result["_frame0"] = frame_pixels(store, "timed", 0)  # for comparing variants; not saved
        return result


def warm_up(render: Render, frames: int, batch_size: int) -> tuple[int, float]:
    """One batch (it pays any compile): the batch size the service chose, and the seconds it took."""
    started = time.perf_counter()
    warm = render("warmup", FrameSelection("range", start=0, end=min(frames, batch_size or frames)))
    chosen = warm[-1].summary.batch_size
    warmup_seconds = time.perf_counter() - started
    note(f"service warm-up batch of {chosen}: {warmup_seconds:.1f} s")
    return chosen, warmup_seconds


def timed(engine: SDXLEngine, render: Render, chosen: int, warmup_seconds: float) -> dict[str, Any]:
    """Every frame of the story, timed, with stage times, host syncs and (on a GPU) peak memory."""
    if device_is_cuda(engine):
        torch.cuda.reset_peak_memory_stats(engine.device)
        resident = torch.cuda.memory_allocated(engine.device)
    synchronize(engine.device)
    engine.reset_stage_seconds()
    with SyncCounter(engine.device) as syncs:
        started = time.perf_counter()
        events = render("timed", FrameSelection("all"))
        synchronize(engine.device)
        seconds = time.perf_counter() - started
    summary = events[-1].summary
    note(f"service: {seconds / summary.rendered:.3f} s/image over {summary.rendered} frames")
    result: dict[str, Any] = {
        "images": summary.rendered,
        "seconds": seconds,
        "seconds_per_image": seconds / summary.rendered,
        "batch_size": chosen,
        "render_seconds": summary.render_seconds,
        "render_seconds_per_image": summary.render_seconds / summary.rendered,
        "batches": -(-summary.rendered // chosen),
        "warmup_seconds": warmup_seconds,
        "stage_seconds_per_image": {k: v / summary.rendered for k, v in engine.stage_seconds.items()},
    }
    if syncs.enabled:
        result["host_syncs"] = syncs.count
        result["host_syncs_per_batch"] = syncs.count / result["batches"]
        result["host_sync_sites"] = syncs.sites
    if device_is_cuda(engine):
        peak = torch.cuda.max_memory_allocated(engine.device)
        result["peak_memory_bytes"] = peak
        result["peak_bytes_per_image"] = (peak - resident) / chosen
    return result


def frame_pixels(store, job: str, index: int) -> np.ndarray:
    from PIL import Image

    data = store.get_bytes(keys.frame_key(job, 0, index))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def device_is_cuda(engine: SDXLEngine) -> bool:
    return engine.device.type == "cuda"
