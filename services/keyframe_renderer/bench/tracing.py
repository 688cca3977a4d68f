"""Dynamo's tracing time for the real SDXL UNets: whole, per transformer block (``compile_regional``), and
loaded from an ahead-of-time compiled artifact (``aot``).

    python -m services.keyframe_renderer.bench.tracing [--unet base|refiner] [--out FILE]

Builds the UNet from the real config with random bf16 weights (CPU is enough: tracing is Python work)
and compiles it with ``backend="eager"``, which runs Dynamo alone: the part of a compile that a replica
pays again on every start even when inductor's output comes from the compile cache. Each scope runs in a
fresh process (Dynamo's caches are per process); it prints one JSON line per scope: the first compiled
call minus a second one is the tracing. ``aot`` compiles the UNet's forward ahead of time
(``torch.compile(...).forward.aot_compile``) in one process and saves it; a second process loads it
(``torch.compiler.load_compiled_function``) and its load plus first call minus second is what a replica
would pay instead of tracing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCOPES = ("whole", "regional", "aot")


def unet_inputs(config: dict[str, Any], refiner: bool, latent: int, dtype) -> tuple[tuple, dict]:  # noqa: ANN001
    """One guided step's UNet call, as the pipelines make it: ``(args, kwargs)``."""
    import torch

    sample = torch.randn(2, config["in_channels"], latent, latent, dtype=dtype)
    text = torch.randn(2, 77, config["cross_attention_dim"], dtype=dtype)
    # SDXL's micro-conditioning: 6 time ids on the base (sizes, crop), 5 on the refiner (aesthetic
    # score instead of the target size), each embedded in addition_time_embed_dim dims beside the
    # pooled text embedding.
    time_ids = 5 if refiner else 6
    pooled = config["projection_class_embeddings_input_dim"] - config["addition_time_embed_dim"] * time_ids
    added = {
        "text_embeds": torch.randn(2, pooled, dtype=dtype),
        "time_ids": torch.randn(2, time_ids, dtype=dtype),
    }
    kwargs = {"encoder_hidden_states": text, "added_cond_kwargs": added, "return_dict": False}
    return (sample, torch.tensor(999.0)), kwargs


def measure(
    unet_name: str,
    scope: str,
    latent: int = 16,
    *,
    config: dict[str, Any] | None = None,
    artifact: Path | None = None,
    save: bool = False,
) -> dict:
    """One scope in this process. ``aot`` with ``save`` compiles and writes ``artifact``; without, it
    loads ``artifact`` (written by a process that built the same UNet from the same seed)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from torch._dynamo.utils import counters

    from dreamframe.models.sdxl_configs import real_sdxl_base_configs, real_sdxl_refiner_unet_config

    if config is None:
        config = real_sdxl_base_configs()["unet"] if unet_name == "base" else real_sdxl_refiner_unet_config()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNet2DConditionModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    args, kwargs = unet_inputs(config, unet_name == "refiner", latent, torch.bfloat16)

    def timed(call) -> tuple[float, Any]:  # noqa: ANN001
        began = time.perf_counter()
        with torch.no_grad():
            out = call(*args, **kwargs)[0]
        return time.perf_counter() - began, out

    eager, expected = timed(unet)
    result: dict[str, Any] = {"unet": unet_name, "scope": scope, "eager_forward_s": round(eager, 2)}
    call = unet
    if scope == "aot":
        # Only the tensors' shapes, dtypes and devices are guarded: module and global guards cannot be
        # serialized, and the renderer keys each artifact by model, options and shapes anyway.
        options = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
        began = time.perf_counter()
        if save:
            with torch.no_grad():
                compiled = torch.compile(unet, backend="eager", fullgraph=True, options=options)
                function = compiled.forward.aot_compile((args, kwargs))
            function.save_compiled_function(str(artifact))
            result.update(aot_compile_s=round(time.perf_counter() - began, 2), bytes=artifact.stat().st_size)
            return result | {"torch": torch.__version__}
        with artifact.open("rb") as f:
            function = torch.compiler.load_compiled_function(f)
        result["load_s"] = round(time.perf_counter() - began, 2)

        def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            return function(unet, *a, **kw)

        modules = 1
    else:
        targets = (
            [unet]
            if scope == "whole"
            else [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
        )
        for module in targets:
            module.compile(backend="eager", fullgraph=True)
        modules = len(targets)
    (first, out), (second, _) = timed(call), timed(call)
    tracing = first - second + result.get("load_s", 0.0)
    return result | {
        "modules_compiled": modules,
        "graphs": counters["stats"]["unique_graphs"],
        "first_compiled_call_s": round(first, 2),
        "second_call_s": round(second, 2),
        "tracing_s": round(tracing, 2),
        "same_as_eager": bool(torch.equal(out, expected)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def run_scope(unet: str, scope: str, *extra: str) -> dict:
    """``measure`` in a fresh process: its JSON line."""
    command = [sys.executable, "-m", __spec__.name, "--unet", unet, "--scope", scope, *extra]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=("base", "refiner"), default="base")
    parser.add_argument("--scope", choices=SCOPES, help="one scope, in this process")
    parser.add_argument("--artifact", type=Path, help="aot: the compiled function's file")
    parser.add_argument("--save", action="store_true", help="aot: compile and write --artifact")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.scope:
        print(json.dumps(measure(args.unet, args.scope, artifact=args.artifact, save=args.save)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        artifact = str(Path(tmp) / f"{args.unet}.aot")
        for scope in SCOPES:
            if scope == "aot":
                saved = run_scope(args.unet, scope, "--artifact", artifact, "--save")
                row = run_scope(args.unet, scope, "--artifact", artifact)
                row.update(aot_compile_s=saved["aot_compile_s"], bytes=saved["bytes"])
            else:
                row = run_scope(args.unet, scope)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
