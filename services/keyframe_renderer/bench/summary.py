"""The benchmark's figures and its report: the compute floor (FLOPs per image ÷ the peak and ÷ the
measured GEMM rate), model FLOPs utilisation and speedups, the markdown table and notes, and the
``render-bench.json`` / ``render-bench.md`` files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..engine import SDPA_BACKENDS

H100_SXM_BF16_DENSE = 989e12
# Dense bf16 tensor-core peaks from NVIDIA's datasheets, by a part of torch's device name (first match).
DATASHEET_BF16_DENSE = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", H100_SXM_BF16_DENSE),
    ("A100", 312e12),
)


# --- figures -----------------------------------------------------------------------------------------
def si(value: float) -> str:
    """1.23e12 → '1.23 T' (FLOP counts span tiny CPU models to full-size SDXL)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def bf16_peak(given: float | None, device: torch.device, gemm: dict[str, Any]) -> tuple[float, str]:
    """(bf16 peak FLOP/s, where it comes from): ``--peak-flops``, else on a GPU the datasheet peak; on a
    CPU the measured GEMM stands in for it."""
    if given:
        return given, "--peak-flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, peak in DATASHEET_BF16_DENSE:
            if part in name:
                return peak, f"{part} bf16 dense, datasheet"
        return (
            H100_SXM_BF16_DENSE,
            f"H100 SXM bf16 dense: no datasheet figure here for {name}; see --peak-flops",
        )
    return gemm["flops_per_second"], "measured GEMM (CPU)"


def floor_seconds_per_image(per_image: float, peak: float, gemm: dict[str, Any]) -> dict[str, float]:
    """Seconds per image if every FLOP ran at the peak, and at the measured GEMM rate."""
    return {"peak": per_image / peak, "measured_gemm": per_image / gemm["flops_per_second"]}


def headline(report: dict[str, Any], name: str, result: dict[str, Any], attention: str) -> None:
    """Make ``result`` (variant ``name``) the report's "service" figure, with its MFU and speedups."""
    reference, reference_compiled = report["reference"], report["reference_compiled"]
    report["service"], report["service_variant"] = result, name
    report["attention"] = attention
    report["mfu"] = report["flops"]["per_image"] / result["seconds_per_image"] / report["peak_flops"]
    if reference:
        report["speedup"] = reference["seconds_per_image"] / result["seconds_per_image"]
    if reference_compiled:
        report["speedup_vs_compiled_reference"] = (
            reference_compiled["seconds_per_image"] / result["seconds_per_image"]
        )


def stage_flops_per_image(flops: dict[str, Any]) -> dict[str, float]:
    """FLOPs per image of each engine stage, from the per-module count."""
    m, batch = flops["modules"], flops["batch_size"]

    def total(*names: str) -> float:
        return sum(m[n]["flops"] for n in names if n in m) / batch

    return {
        "encode": total("text_encoder", "text_encoder_2"),
        "base": total("base_unet"),
        "refiner": total("refiner_unet"),
        "decode": total("vae_decode", "vae_post_quant_conv"),
    }


def gemm_floor(report: dict[str, Any]) -> float:
    """Seconds per image at the measured GEMM rate."""
    return report["flops"]["per_image"] / report["gemm"]["flops_per_second"]


# --- the summary ---------------------------------------------------------------------------------------
def summarize(report: dict[str, Any]) -> str:
    return "\n".join(
        [
            *heading_lines(report),
            "",
            *table_lines(report),
            "",
            *variant_lines(report),
            *flops_lines(report),
            *kernel_lines(report),
            *service_lines(report),
            *target_lines(report),
            *precision_lines(report),
            f"bench wall time {report['elapsed_seconds']:.0f} s",
        ]
    )


def heading_lines(report: dict[str, Any]) -> list[str]:
    env = report["env"]
    return [
        f"Keyframe renderer benchmark — {env.get('gpu', env['device'])}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}",
        f"model {report['preset']} {report['size']}x{report['size']}, {report['steps']} steps "
        f"(base {report['step_split'][0]} + refiner {report['step_split'][1]}), guidance 5.0",
    ]


def table_lines(report: dict[str, Any]) -> list[str]:
    """One row per setting that ran: the references, then the service's variants."""
    ref, ref_c = report["reference"], report.get("reference_compiled")
    rows = []
    if ref:
        rows.append(("reference (one at a time, eager)", ref, report["reference_dtype"]))
    if ref_c:
        rows.append(
            (f"reference (one at a time, compile {ref_c['compile']})", ref_c, report["reference_dtype"])
        )
    for v in report["variants"]:
        if "result" in v:
            rows.append((f"service: {v['name']}", v["result"], report["dtype"]))
    lines = [
        "| setting | batch | dtype | images | s/image | images/s | vs reference | vs compiled ref. | FLOP/s "
        "| MFU (peak) | × GEMM floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r, dtype in rows:
        lines.append("| " + " | ".join(str(c) for c in table_cells(report, name, r, dtype)) + " |")
    return lines


def table_cells(report: dict[str, Any], name: str, r: dict[str, Any], dtype: str) -> list[Any]:
    ref, ref_c = report["reference"], report.get("reference_compiled")
    base_ips = 1 / ref["seconds_per_image"] if ref else None
    compiled_ips = 1 / ref_c["seconds_per_image"] if ref_c else None
    ips = 1 / r["seconds_per_image"]
    achieved = report["flops"]["per_image"] * ips
    return [
        name,
        r["batch_size"],
        dtype,
        r["images"],
        f"{r['seconds_per_image']:.3f}",
        f"{ips:.3f}",
        f"{ips / base_ips:.2f}×" if base_ips else "–",
        f"{ips / compiled_ips:.2f}×" if compiled_ips else "–",
        si(achieved),
        f"{achieved / report['peak_flops']:.1%}",
        f"{r['seconds_per_image'] / gemm_floor(report):.2f}",
    ]


def variant_lines(report: dict[str, Any]) -> list[str]:
    """Per variant: seconds (and FLOP/s) per stage, render-only time, warm-up, the frame-0 difference —
    or why it did not run."""
    stage_flops = stage_flops_per_image(report["flops"])
    lines = []
    for v in report["variants"]:
        if "result" not in v:
            lines.append(f"{v['name']} ({v['options_text']}): {v.get('error') or v.get('skipped')}")
            continue
        r = v["result"]
        stages = ", ".join(
            f"{k} {sec:.3f} s"
            + (f" ({si(stage_flops[k] / sec)}FLOP/s)" if sec > 0 and stage_flops[k] else "")
            for k, sec in r["stage_seconds_per_image"].items()
        )
        diff = (
            f"; frame 0 vs {v['diff_against']}: max {v['diff']['max']:.0f}, mean {v['diff']['mean']:.2f}"
            if ("diff" in v)
            else ""
        )
        lines.append(
            f"{v['name']} ({v['options_text']}): per image {stages}; render only "
            f"{r['render_seconds_per_image']:.3f} s/image; warm-up (compile) {r['warmup_seconds']:.0f} s; "
            f"variant total {v['wall_seconds']:.0f} s{diff}"
        )
    return lines


def flops_lines(report: dict[str, Any]) -> list[str]:
    """FLOPs per image by module, the eager batch's module times, and the two floors."""
    fl, peak, gemm = report["flops"], report["peak_flops"], report["gemm"]["flops_per_second"]
    per_image = fl["per_image"]
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
    return [
        "",
        f"FLOPs per image: {si(per_image)}FLOP (one batch of {fl['batch_size']} counted: {parts})",
        f"eager batch of {fl['batch_size']} ({report['eager_options']}): "
        f"{fl.get('eager_batch_seconds', 0):.2f} s — {eager}",
        f"peak: {si(peak)}FLOP/s ({report['peak_source']}) → floor {per_image / peak:.4f} s/image",
        f"measured GEMM ({report['gemm']['n']}³ {report['gemm']['dtype']}): {si(gemm)}FLOP/s "
        f"→ floor {per_image / gemm:.4f} s/image",
    ]


def kernel_lines(report: dict[str, Any]) -> list[str]:
    """The VAE layouts and the SDPA kernels timed alone (when they were)."""
    lines = []
    vae = report.get("vae_layouts")
    if vae:
        lines.append(
            f"eager VAE decode of a batch: channels-last {vae['channels_last']:.3f} s, "
            f"contiguous {vae['contiguous']:.3f} s"
        )
    for row in report.get("attention_kernels", []):
        rates = ", ".join(
            f"{k} {si(row[k])}FLOP/s" if row.get(k) else f"{k} n/a"
            for k in ("auto", *[b for b in SDPA_BACKENDS if b != "auto"])
        )
        lines.append(
            f"SDPA {row['shape']} {row['b_h_nq_nk_d']} (auto picks {row.get('auto_choice', '?')}): {rates}"
        )
    return lines


def service_lines(report: dict[str, Any]) -> list[str]:
    """Host syncs and peak memory of the headline variant."""
    svc = report.get("service")
    if not svc:
        return []
    lines = []
    if "host_syncs" in svc:
        per_batch = svc["host_syncs_per_batch"]
        lines.append(
            f"host syncs ({report['service_variant']}): {svc['host_syncs']} over {svc['batches']} "
            f"batches ({per_batch:.1f} per batch of {report['steps']} steps): {svc['host_sync_sites']}"
        )
    if "peak_bytes_per_image" in svc:
        lines.append(
            f"peak memory ({report['service_variant']}) {svc['peak_memory_bytes'] / 2**30:.1f} GiB, "
            f"{svc['peak_bytes_per_image'] / 2**30:.2f} GiB per image above the weights"
        )
    return lines


def target_lines(report: dict[str, Any]) -> list[str]:
    """Each variant against the targets: ≥ 2.5× the eager reference, ≤ 1.6× the measured-GEMM floor."""
    ref = report["reference"]
    lines = []
    for v in report["variants"] if ref else []:
        if "result" in v:
            spi = v["result"]["seconds_per_image"]
            lines.append(
                f"targets ({v['name']}): speedup {ref['seconds_per_image'] / spi:.2f}× the eager "
                f"reference (≥ 2.5×), {spi / gemm_floor(report):.2f}× the measured-GEMM floor (≤ 1.6×)"
            )
    return lines


def precision_lines(report: dict[str, Any]) -> list[str]:
    """What FP8 costs in precision, and the linear layers' bf16 vs FP8 throughput."""
    precision = report.get("fp8_precision") or {}
    lines = []
    if "fp8_vs_fp32" in precision:
        lines.append(
            f"FP8 precision (base UNet, first step, {precision['layers']} linear layers FP8): relative L2 "
            f"error vs fp32 — bf16 {precision['bf16_vs_fp32']:.2e}, FP8 {precision['fp8_vs_fp32']:.2e} "
            f"(FP8 vs bf16 {precision['fp8_vs_bf16']:.2e})"
        )
    elif precision:
        lines.append(f"FP8 precision: {precision.get('skipped')}")
    for row in precision.get("linears", []):
        lines.append(
            f"linear {row['shape']} {row['m_k_n']}: bf16 {si(row['bf16'])}FLOP/s; FP8 GEMM alone "
            f"{si(row['fp8'])}FLOP/s, FP8 layer eager {si(row['fp8_layer_eager'])}FLOP/s"
        )
    return lines


# --- the files -----------------------------------------------------------------------------------------
def write_report(report: dict[str, Any], out: Path, began: float) -> str:
    """``render-bench.json`` (without the private ``_`` keys of the variants) and ``render-bench.md``
    under ``out``, with the time since ``began``; returns the summary."""
    report["elapsed_seconds"] = time.perf_counter() - began
    table = summarize(report)
    clean = {
        **report,
        "variants": [{k: v for k, v in x.items() if not k.startswith("_")} for x in report["variants"]],
    }
    (out / "render-bench.json").write_text(json.dumps(clean, indent=2, default=str) + "\n")
    (out / "render-bench.md").write_text(table + "\n")
    return table
