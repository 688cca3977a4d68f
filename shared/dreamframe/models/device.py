"""Which device and dtype a model runs on (torch only: the LLM and vision models use it without diffusers)."""

from __future__ import annotations

import torch


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the reference's fp16 without its overflow problems in the VAE); fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
