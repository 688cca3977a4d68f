"""Keyframe-renderer benchmark: the reference setting vs the service's fast path vs the compute floor.

    python -m services.keyframe_renderer.bench --out bench/            # GPU: full-size SDXL, random weights
    python -m services.keyframe_renderer.bench --preset tiny --out /tmp/b   # CPU smoke run in seconds

Measures, on the current device, in one run:
- (a) the reference setting: the paper's loop — one image per call, fp16 (fp32 on a CPU), text prompts
  through both diffusers pipelines, PIL PNG saved per frame;
- (b) the service: ``Renderer.render`` end to end (batched bf16 engine, PNG + sidecar writes into a
  LocalStore), at ``--batch-size`` (0 = chosen from free memory, as the service does);
- FLOPs per image, counted with ``torch.utils.flop_counter.FlopCounterMode`` over one real batch
  (per module: base UNet × its steps, refiner UNet × its steps, VAE decode, text encoders);
- the compute floor: FLOPs per image ÷ the bf16 peak (``--peak-flops``, default H100 SXM dense 989e12)
  and ÷ the matmul throughput this run measures on a large GEMM; model FLOPs utilisation;
- host synchronisations per batch (CUDA sync debug mode) and peak memory per image.

Prints a table and writes ``render-bench.json`` and ``render-bench.md`` under ``--out``.
Presets: ``sdxl-random`` (the real SDXL base + refiner + VAE architecture with random weights, from
dreamframe.models.sdxl_configs; no download), ``sdxl`` (real weights per the renderer config), ``tiny``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dreamframe import keys
from dreamframe.benchmarking import default_gemm_size, matmul_flops_per_second, synchronize
from dreamframe.config import RendererSettings, get_settings
from dreamframe.models import sdxl
from dreamframe.storage.base import ObjectRef
from dreamframe.story import Story, StoryItem, Substory, TinyStory

from .engine import SDXLEngine, model_id
from .options import DEFAULT_NEGATIVE_PROMPT, FrameSelection, RenderOptions, resolve_options
from .renderer import Renderer, RenderRequest

H100_SXM_BF16_DENSE = 989e12
RANDOM_PRESET = "sdxl-random"
PROMPTS = [
    "at a rainy street corner, a man looks like Tom Hanks in blue is standing under a lamp",
    "in a small kitchen, a woman looks like Emma Stone in red is holding a cup of tea",
    "on a wooden pier at dusk, a man looks like Tom Hanks in blue is looking at the sea",
    "in a crowded train station, a woman looks like Emma Stone in red is walking fast",
]


# --- models ------------------------------------------------------------------------------------------
def build_pipes(preset: str, device: torch.device, dtype: torch.dtype, cache_dir: Path) -> sdxl.SDXLPipelines:
    if preset == RANDOM_PRESET:
        # The one import to swap for another real-size builder.
        from dreamframe.models.sdxl_configs import build_random_sdxl

        return build_random_sdxl(device=device, dtype=dtype, with_refiner=True)
    settings = get_settings().renderer
    return sdxl.load_sdxl(
        preset, model_paths=settings.model_paths, cache_dir=cache_dir, device=str(device), dtype=dtype
    )


def cast(pipes: sdxl.SDXLPipelines, dtype: torch.dtype) -> sdxl.SDXLPipelines:
    """The same weights in another precision, in place (the refiner shares text_encoder_2 and VAE)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []" is noise here
    try:
        pipes.base.to(dtype=dtype)
        if pipes.refiner is not None:
            pipes.refiner.unet.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    return sdxl.SDXLPipelines(pipes.base, pipes.refiner, pipes.preset, pipes.resolution, pipes.device, dtype)


def note(message: str) -> None:
    """Progress on stderr, so a run cut short still says how far it got."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- (a) the reference loop --------------------------------------------------------------------------
def run_reference(
    pipes: sdxl.SDXLPipelines, *, frames: int, steps: int, size: int, fraction: float, out_dir: Path
) -> dict[str, Any]:
    """The paper's loop: one frame per call, text prompts into both pipelines, PNG saved per frame."""

    def one(i: int) -> None:
        prompt = f"generate an image in Dramatic style: {PROMPTS[i % len(PROMPTS)]}"
        generator = torch.Generator(device=pipes.device).manual_seed(20 + i)
        latents = pipes.base(
            prompt=prompt,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT,
            num_inference_steps=steps,
            denoising_end=fraction,
            height=size,
            width=size,
            output_type="latent",
            generator=generator,
        ).images
        image = pipes.refiner(
            prompt=prompt,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT,
            num_inference_steps=steps,
            denoising_start=fraction,
            image=latents,
            generator=generator,
        ).images[0]
        image.save(out_dir / f"{i}.png")

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the fp16 VAE's upcast logs a line per frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random fp16 weights overflow to NaN: harmless for timing
        one(0)  # warm-up (kernel selection, allocator)
        synchronize(pipes.device)
        started = time.perf_counter()
        for i in range(1, frames + 1):
            one(i)
        synchronize(pipes.device)
        seconds = time.perf_counter() - started
    diffusers_logging.set_verbosity(level)
    return {"images": frames, "seconds": seconds, "seconds_per_image": seconds / frames, "batch_size": 1}


# --- FLOPs -------------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def bench_modules(engine: SDXLEngine) -> dict[str, torch.nn.Module]:
    base, refiner = engine.base, engine.refiner
    modules = {
        "base_unet": base.unet,
        "refiner_unet": refiner.unet if refiner is not None else None,
        "vae_decode": base.vae.decoder,
        "vae_post_quant_conv": base.vae.post_quant_conv,
        "text_encoder": base.text_encoder,
        "text_encoder_2": base.text_encoder_2,
    }
    return {name: m for name, m in modules.items() if m is not None}


def time_modules(engine: SDXLEngine, params, batch: int) -> dict[str, Any]:
    """Device time per module over one eager batch (CUDA events in forward hooks: no host syncs)."""
    cuda = engine.device.type == "cuda"
    marks: dict[str, list] = {name: [] for name in bench_modules(engine)}
    handles = []
    for name, module in bench_modules(engine).items():

        def pre(_m, _a, name=name):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks[name].append([event, None])
            else:
                marks[name].append([time.perf_counter(), None])

        def post(_m, _a, _o, name=name):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks[name][-1][1] = event
            else:
                marks[name][-1][1] = time.perf_counter()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    try:
        synchronize(engine.device)
        started = time.perf_counter()
        engine.render(prompts, list(range(20, 20 + batch)), params)
        synchronize(engine.device)
        total = time.perf_counter() - started
    finally:
        for handle in handles:
            handle.remove()
    seconds = {
        name: sum((a.elapsed_time(b) / 1e3 if cuda else b - a) for a, b in pairs)
        for name, pairs in marks.items()
    }
    return {"batch_size": batch, "total_seconds": total, "seconds": seconds}


def count_flops(engine: SDXLEngine, params, batch: int) -> dict[str, Any]:
    """FLOPs of one real batch, split by module with forward hooks (calls × FLOPs per call)."""
    from torch.utils.flop_counter import FlopCounterMode

    modules = bench_modules(engine)
    custom = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        # PyTorch's table has the CUDA kernels only; count the CPU flash kernel the same way.
        custom[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    stats = {name: {"calls": 0, "flops": 0} for name, m in modules.items() if m is not None}
    handles = []
    starts: dict[str, int] = {}
    for name, module in modules.items():
        if module is None:
            continue

        def pre(_m, _a, name=name):
            starts[name] = counter.get_total_flops()

        def post(_m, _a, _o, name=name):
            stats[name]["calls"] += 1
            stats[name]["flops"] += counter.get_total_flops() - starts[name]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    try:
        with counter:
            engine.render(prompts, list(range(20, 20 + batch)), params)
    finally:
        for handle in handles:
            handle.remove()
    total = counter.get_total_flops()
    for entry in stats.values():
        entry["flops_per_call"] = entry["flops"] // max(entry["calls"], 1)
    return {"batch_size": batch, "total": total, "per_image": total / batch, "modules": stats}


def gemm_flops_per_second(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Dense matmul throughput on this device: the practical ceiling for the UNet's GEMMs/convs."""
    n, iters = default_gemm_size(device), 30 if device.type == "cuda" else 5
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_second": matmul_flops_per_second(device, dtype, n, iters),
    }


# --- (b) the service ---------------------------------------------------------------------------------
def bench_story(frames: int) -> Story:
    items = [StoryItem(kind="frame", text=PROMPTS[i % len(PROMPTS)] + f", shot {i}") for i in range(frames)]
    return Story(
        overview="benchmark",
        style_keyword="Dramatic",
        substories=[Substory(tiny_stories=[TinyStory(items=items)])],
    )


class SyncCounter:
    """Counts host synchronisations (CUDA sync debug mode) and where they come from."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.sites: dict[str, int] = {}
        self._catch = warnings.catch_warnings(record=True)

    def __enter__(self) -> SyncCounter:
        if self.enabled:
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        for record in self._records:
            if "synchroniz" in str(record.message):
                site = f"{Path(record.filename).name}:{record.lineno}"
                self.sites[site] = self.sites.get(site, 0) + 1

    @property
    def count(self) -> int:
        return sum(self.sites.values())


def run_service(
    engine: SDXLEngine, *, frames: int, steps: int, size: int, fraction: float, batch_size: int, compile: bool
) -> dict[str, Any]:
    """``Renderer.render`` end to end into a LocalStore: warm-up batch, then ``frames`` timed frames."""
    from dreamframe.storage import LocalStore

    with tempfile.TemporaryDirectory(prefix="render-bench-") as tmp:
        store = LocalStore(Path(tmp), "bench")
        renderer = Renderer(store, RendererSettings(preset=engine.pipes.preset, device=str(engine.device)))
        renderer.engines.put(engine.pipes.preset, engine)
        story = bench_story(frames)
        ref: ObjectRef = store.put_bytes(keys.story_key("bench"), story.to_json().encode())
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

        started = time.perf_counter()
        warm = render("warmup", FrameSelection("range", start=0, end=min(frames, batch_size or frames)))
        chosen = warm[-1].summary.batch_size
        note(f"service warm-up batch of {chosen}: {time.perf_counter() - started:.1f} s")
        if device_is_cuda(engine):
            torch.cuda.reset_peak_memory_stats(engine.device)
            resident = torch.cuda.memory_allocated(engine.device)
        synchronize(engine.device)
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
        }
        if syncs.enabled:
            result["host_syncs"] = syncs.count
            result["host_syncs_per_batch"] = syncs.count / result["batches"]
            result["host_sync_sites"] = syncs.sites
        if device_is_cuda(engine):
            peak = torch.cuda.max_memory_allocated(engine.device)
            result["peak_memory_bytes"] = peak
            result["peak_bytes_per_image"] = (peak - resident) / chosen
        renderer.close()
        return result


def device_is_cuda(engine: SDXLEngine) -> bool:
    return engine.device.type == "cuda"


# --- report ------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    env = {
        "device": str(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["torch_threads"] = torch.get_num_threads()
    return env


def si(value: float) -> str:
    """1.23e12 → '1.23 T' (FLOP counts span tiny CPU models to full-size SDXL)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def summarize(report: dict[str, Any]) -> str:
    ref, svc, fl = report["reference"], report["service"], report["flops"]
    peak, gemm = report["peak_flops"], report["gemm"]["flops_per_second"]
    per_image = fl["per_image"]
    floor_peak, floor_gemm = per_image / peak, per_image / gemm
    env = report["env"]
    lines = [
        f"Keyframe renderer benchmark — {env.get('gpu', env['device'])}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}",
        f"model {report['preset']} {report['size']}x{report['size']}, {report['steps']} steps "
        f"(base {report['step_split'][0]} + refiner {report['step_split'][1]}), guidance 5.0, "
        f"attention {report['attention']}, compile {report['compile'] or 'off'}",
        "",
        "| setting | batch | dtype | images | s/image | images/s | speedup | FLOP/s | MFU (peak) "
        "| × GEMM floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("reference (one at a time)", ref, report["reference_dtype"])] if ref else []
    rows.append(("service (batched)", svc, report["dtype"]))
    base_ips = 1 / ref["seconds_per_image"] if ref else None
    for name, r, dtype in rows:
        ips = 1 / r["seconds_per_image"]
        achieved = per_image * ips
        cells = [
            name,
            r["batch_size"],
            dtype,
            r["images"],
            f"{r['seconds_per_image']:.3f}",
            f"{ips:.3f}",
            f"{ips / base_ips:.2f}×" if base_ips else "–",
            si(achieved),
            f"{achieved / peak:.1%}",
            f"{r['seconds_per_image'] / floor_gemm:.2f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    parts = ", ".join(
        f"{name} {si(m['flops_per_call'])}FLOP × {m['calls']}"
        for name, m in fl["modules"].items()
        if m["calls"]
    )
    eager = ", ".join(
        f"{name} {m['seconds']:.2f} s ({si(m['flops_per_second'])}FLOP/s)"
        for name, m in fl["modules"].items()
        if m["calls"] and "seconds" in m
    )
    lines += [
        "",
        f"FLOPs per image: {si(per_image)}FLOP (one batch of {fl['batch_size']} counted: {parts})",
        f"eager batch of {fl['batch_size']}: {fl.get('eager_batch_seconds', 0):.2f} s — {eager}",
        f"peak: {si(peak)}FLOP/s ({report['peak_source']}) → floor {floor_peak:.4f} s/image",
        f"measured GEMM ({report['gemm']['n']}³ {report['gemm']['dtype']}): {si(gemm)}FLOP/s "
        f"→ floor {floor_gemm:.4f} s/image",
        f"service render only (GPU work + one copy per batch): {svc['render_seconds_per_image']:.3f} s/image",
    ]
    if "host_syncs" in svc:
        per_batch = svc["host_syncs_per_batch"]
        lines.append(
            f"host syncs: {svc['host_syncs']} over {svc['batches']} batches "
            f"({per_batch:.1f} per batch of {report['steps']} steps): {svc['host_sync_sites']}"
        )
    if "peak_bytes_per_image" in svc:
        lines.append(
            f"peak memory {svc['peak_memory_bytes'] / 2**30:.1f} GiB, "
            f"{svc['peak_bytes_per_image'] / 2**30:.2f} GiB per image above the weights"
        )
    if ref:
        lines.append(
            f"targets: speedup {1 / svc['seconds_per_image'] / base_ips:.2f}× (≥ 2.5×), "
            f"{svc['seconds_per_image'] / floor_gemm:.2f}× the measured-GEMM floor (≤ 1.6×)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", default=None, help=f"{RANDOM_PRESET} (GPU default), sdxl, or tiny (CPU default)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=16, help="timed frames in the service run")
    p.add_argument(
        "--reference-frames", type=int, default=3, help="timed frames in the reference run (0: skip)"
    )
    p.add_argument("--batch-size", type=int, default=0, help="0 = from free memory, as the service chooses")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--high-noise-fraction", type=float, default=0.75)
    p.add_argument("--resolution", type=int, default=0, help="0 = the preset's (1024 for SDXL)")
    p.add_argument(
        "--compile",
        default="",
        choices=["", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode for both UNets (empty: off, the service default)",
    )
    p.add_argument(
        "--peak-flops", type=float, default=None, help="bf16 dense peak (default: H100 SXM 989e12)"
    )
    p.add_argument("--out", type=Path, default=Path("bench"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = sdxl.pick_device(args.device)
    preset = args.preset or (RANDOM_PRESET if device.type == "cuda" else sdxl.TINY)
    fast_dtype = sdxl.pick_dtype(device)  # bf16 on GPUs
    reference_dtype = torch.float16 if device.type == "cuda" else torch.float32
    cache_dir = get_settings().models.cache_dir
    args.out.mkdir(parents=True, exist_ok=True)

    pipes = build_pipes(preset, device, reference_dtype, cache_dir)
    size = args.resolution or pipes.resolution
    reference = None
    if args.reference_frames > 0:
        with tempfile.TemporaryDirectory(prefix="render-ref-") as tmp:
            reference = run_reference(
                pipes,
                frames=args.reference_frames,
                steps=args.steps,
                size=size,
                fraction=args.high_noise_fraction,
                out_dir=Path(tmp),
            )
        note(f"reference: {reference['seconds_per_image']:.3f} s/image")
    pipes = cast(pipes, fast_dtype)
    mid = (
        RANDOM_PRESET
        if preset == RANDOM_PRESET
        else model_id(preset, get_settings().renderer.model_paths, cache_dir)
    )
    engine = SDXLEngine(pipes, model_id=mid, channels_last=True)
    params = resolve_options(
        RenderOptions(
            steps=args.steps, high_noise_fraction=args.high_noise_fraction, width=size, height=size
        ),
        preset=preset,
        resolution=size,
        default_batch_size=args.batch_size,
        compile_default=False,
    )
    split = engine.step_split(params)
    batch = args.batch_size or engine.auto_batch_size(params, max_batch=8, cpu_batch=4)
    flops = count_flops(engine, params, batch)  # eager, before any compile
    note(f"FLOPs per image {si(flops['per_image'])}FLOP at batch {batch}")
    timing = time_modules(engine, params, batch)  # eager too: hooks would break compiled graphs
    for name, seconds in timing["seconds"].items():
        flops["modules"][name]["seconds"] = seconds
        flops["modules"][name]["flops_per_second"] = (
            flops["modules"][name]["flops"] / seconds if seconds else 0.0
        )
    flops["eager_batch_seconds"] = timing["total_seconds"]
    spent = ", ".join(f"{k} {v:.2f} s" for k, v in timing["seconds"].items())
    note(f"eager batch {timing['total_seconds']:.2f} s: {spent}")
    if args.compile:
        note(f"compiling the UNets ({args.compile}); the warm-up batch pays for it")
        engine.compile(args.compile)
    service = run_service(
        engine,
        frames=args.frames,
        steps=args.steps,
        size=size,
        fraction=args.high_noise_fraction,
        batch_size=batch,
        compile=bool(args.compile),
    )
    gemm = gemm_flops_per_second(device, fast_dtype)
    report = {
        "preset": preset,
        "size": size,
        "steps": args.steps,
        "high_noise_fraction": args.high_noise_fraction,
        "step_split": [split.base, split.refiner],
        "compile": args.compile,
        "dtype": str(fast_dtype).removeprefix("torch."),
        "reference_dtype": str(reference_dtype).removeprefix("torch."),
        "attention": engine.attention,
        "reference": reference,
        "service": service,
        "flops": flops,
        "gemm": gemm,
        # On a GPU the datasheet peak; on a CPU the measured GEMM stands in for it.
        "peak_flops": args.peak_flops
        or (H100_SXM_BF16_DENSE if device.type == "cuda" else gemm["flops_per_second"]),
        "peak_source": "--peak-flops"
        if args.peak_flops
        else ("H100 SXM bf16 dense" if device.type == "cuda" else "measured GEMM (CPU)"),
        "env": environment(device),
    }
    per_image = flops["per_image"]
    report["floor_seconds_per_image"] = {
        "peak": per_image / report["peak_flops"],
        "measured_gemm": per_image / gemm["flops_per_second"],
    }
    report["mfu"] = per_image / service["seconds_per_image"] / report["peak_flops"]
    if reference:
        report["speedup"] = reference["seconds_per_image"] / service["seconds_per_image"]
    table = summarize(report)
    print(table)
    (args.out / "render-bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "render-bench.md").write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
