"""The variants the benchmark compares: engine-option changes against the service's settings, run one
after another on the same engine (the weights are built once), each compared with the first one's frame."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dreamframe.errors import described

from ..engine import EngineOptions, SDXLEngine
from .common import note
from .service import device_is_cuda, run_service
from .summary import headline

# Engine-option changes against the service's settings (``--variant NAME``; ``NAME=key:value,...`` for
# others). "before" is the service as last measured: both UNets compiled with conv_1x1_as_mm only, the
# VAE eager, separate QKV projections, PyTorch's SDPA choice.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "before": {"compile_vae": False, "fuse_qkv": False, "sdpa_backend": "auto", "compile_tuning": False},
    "eager": {"compile_mode": ""},
    "cudnn": {"sdpa_backend": "cudnn"},
    "flash": {"sdpa_backend": "flash"},
    "efficient": {"sdpa_backend": "efficient"},
    "tuned": {"compile_tuning": True},
    "untuned": {"compile_tuning": False},
    "regional": {"compile_regional": True},
    "aot": {"compile_aot": True},
    "unfused": {"fuse_qkv": False},
    "vae-eager": {"compile_vae": False},
    "contiguous": {"channels_last": False},
    "fp8": {"fp8": True},
    "bf16": {"fp8": False},
}
GPU_VARIANTS = ["default", "fp8"]
TRUE, FALSE = ("true", "1", "on", "yes"), ("false", "0", "off", "no")


def parse_variant(spec: str, base: EngineOptions) -> tuple[str, EngineOptions]:
    """``NAME`` (one of VARIANTS) or ``NAME=key:value,key:value`` (EngineOptions fields) → options."""
    name, _, changes = spec.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"--variant {spec!r}: needs a name")
    if not changes:
        if name not in VARIANTS:
            raise ValueError(
                f"--variant {name!r}: unknown; known: {', '.join(VARIANTS)} (or NAME=key:value,...)"
            )
        return name, dataclasses.replace(base, **VARIANTS[name])
    return name, dataclasses.replace(base, **parse_changes(spec, changes))


def parse_changes(spec: str, changes: str) -> dict[str, Any]:
    """``key:value,key:value`` of ``--variant spec`` → EngineOptions field values."""
    types = {f.name: f.type for f in dataclasses.fields(EngineOptions)}
    updates: dict[str, Any] = {}
    for item in changes.split(","):
        key, sep, value = (part.strip() for part in item.partition(":"))
        key = key.replace("-", "_")
        if not sep or key not in types:
            raise ValueError(
                f"--variant {spec!r}: {item!r} is not key:value with a key in {', '.join(types)}"
            )
        updates[key] = parse_value(spec, key, value, types[key])
    return updates


def parse_value(spec: str, key: str, value: str, kind: Any) -> Any:
    if kind in (bool, "bool"):
        if value.lower() not in (*TRUE, *FALSE):
            raise ValueError(f"--variant {spec!r}: {key} must be true or false, got {value!r}")
        return value.lower() in TRUE
    return "" if key == "compile_mode" and value.lower() in ("off", "none", "eager") else value


def pixel_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    diff = np.abs(a - b)
    return {"max": float(diff.max()), "mean": float(diff.mean())}


def over_budget(began: float, last_seconds: float, budget: float) -> str | None:
    """Why the next variant is skipped, when one more like the last would not finish within ``budget``
    seconds of ``began`` (0: no limit)."""
    elapsed = time.perf_counter() - began
    if budget and last_seconds and elapsed + last_seconds > budget:
        return (
            f"skipped: {elapsed:.0f} s spent, the last variant took {last_seconds:.0f} s, "
            f"budget {budget:.0f} s"
        )
    return None


def run_variant(
    engine: SDXLEngine, options: EngineOptions, entry: dict[str, Any], **service: Any
) -> np.ndarray | None:
    """The service on ``engine`` configured with ``options``: the result (or the error) goes into
    ``entry``; returns frame 0's pixels (None when it failed)."""
    try:
        engine.configure(options)
        entry["options_text"] = engine.options.describe()  # what ran (FP8 is off where unsupported)
        result = run_service(engine, compile=bool(options.compile_mode), **service)
    except Exception as exc:  # one variant failing (a kernel, a compile) must not lose the others
        entry["error"] = f"failed: {described(exc)}"[:2000]
        note(f"variant {entry['name']} {entry['error']}")
        engine.uncompile()
        if device_is_cuda(engine):
            torch.cuda.empty_cache()
        return None
    pixels = result.pop("_frame0")
    result["attention"] = engine.attention
    entry["result"] = result
    return pixels


def run_variants(
    engine: SDXLEngine,
    variants: list[tuple[str, EngineOptions]],
    report: dict[str, Any],
    *,
    began: float,
    time_budget: float,
    write: Callable[[], object],
    **service: Any,
) -> None:
    """Each variant in turn into ``report["variants"]``, ``write()`` after each (a run cut short keeps what
    it measured). The first that runs is the headline "service" figure; the others' frame 0 is compared
    with its. ``service``: ``run_service``'s frames, steps, size, fraction and batch_size."""
    last_seconds = 0.0
    first_pixels: tuple[str, np.ndarray] | None = None
    for name, options in variants:
        entry: dict[str, Any] = {
            "name": name,
            "options": dataclasses.asdict(options),
            "options_text": options.describe(),
        }
        report["variants"].append(entry)
        skipped = over_budget(began, last_seconds, time_budget)
        if skipped:
            entry["skipped"] = skipped
            note(f"variant {name}: {skipped}")
            continue
        note(f"variant {name}: {options.describe()}")
        started = time.perf_counter()
        pixels = run_variant(engine, options, entry, **service)
        if pixels is not None:
            if first_pixels is None:
                first_pixels = (name, pixels)
            else:
                entry["diff_against"], entry["diff"] = (
                    first_pixels[0],
                    pixel_difference(first_pixels[1], pixels),
                )
            if report["service"] is None:
                headline(report, name, entry["result"], engine.attention)
        entry["wall_seconds"] = last_seconds = time.perf_counter() - started
        write()
