"""Dynamo's tracing time for the real SDXL UNets, whole vs per transformer block (``compile_regional``).

    python -m services.keyframe_renderer.bench.tracing [--unet base|refiner] [--out FILE]

Builds the UNet from the real config with random bf16 weights (CPU is enough: tracing is Python work)
and compiles it with ``backend="eager"``, which runs Dynamo alone: the part of a compile that a replica
pays again on every start even when inductor's output comes from the compile cache. Each scope runs in a
fresh process (Dynamo's caches are per process); it prints one JSON line per scope: the first compiled
call minus a second one is the tracing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def measure(unet_name: str, scope: str, latent: int = 16) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from torch._dynamo.utils import counters

    from dreamframe.models.sdxl_configs import real_sdxl_base_configs, real_sdxl_refiner_unet_config

    config = real_sdxl_base_configs()["unet"] if unet_name == "base" else real_sdxl_refiner_unet_config()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNet2DConditionModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    bf16 = dict(dtype=torch.bfloat16)
    sample = torch.randn(2, config["in_channels"], latent, latent, **bf16)
    text = torch.randn(2, 77, config["cross_attention_dim"], **bf16)
    # SDXL's micro-conditioning: 6 time ids on the base (sizes, crop), 5 on the refiner (aesthetic
    # score instead of the target size), each embedded in 256 dims beside the pooled text embedding.
    time_ids = 6 if unet_name == "base" else 5
    pooled = config["projection_class_embeddings_input_dim"] - 256 * time_ids
    added = {
        "text_embeds": torch.randn(2, pooled, **bf16),
        "time_ids": torch.randn(2, time_ids, **bf16),
    }

    def forward() -> float:
        began = time.perf_counter()
        with torch.no_grad():
            unet(
                sample,
                torch.tensor(999.0),
                encoder_hidden_states=text,
                added_cond_kwargs=added,
                return_dict=False,
            )
        return time.perf_counter() - began

    eager = forward()
    modules = (
        [unet] if scope == "whole" else [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    )
    for module in modules:
        module.compile(backend="eager", fullgraph=True)
    first, second = forward(), forward()
    return {
        "unet": unet_name,
        "scope": scope,
        "modules_compiled": len(modules),
        "graphs": counters["stats"]["unique_graphs"],
        "eager_forward_s": round(eager, 2),
        "first_compiled_call_s": round(first, 2),
        "second_call_s": round(second, 2),
        "tracing_s": round(first - second, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=("base", "refiner"), default="base")
    parser.add_argument("--scope", choices=("whole", "regional"), help="one scope, in this process")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.scope:
        print(json.dumps(measure(args.unet, args.scope)), flush=True)
        return
    for scope in ("whole", "regional"):
        command = [sys.executable, "-m", __spec__.name, "--unet", args.unet, "--scope", scope]
        line = (
            subprocess.run(command, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
