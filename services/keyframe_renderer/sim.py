"""The ``sim`` preset: a simulated GPU for control-plane tests and benchmarks, not a model.

Everything around the model is the real renderer — the RenderService, frame selection, idempotent
skipping, atomic PNG + sidecar writes, streaming — while ``render`` sleeps a fixed time per frame (what a
GPU would spend) and returns a small deterministic image made from the frame's seed and prompt. So a fleet
of ``sim`` renderer processes behaves like a fleet of GPUs to the coordinator at no compute cost, and a
frame rendered twice is the same bytes.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import torch

from .engine import EngineOptions, StepSplit
from .options import RenderParams
from .style import StyleEmbedding

SIM = "sim"
SIM_VERSION = 1


class SimEngine:
    """The engine interface the renderer uses (see ``SDXLEngine``), with a fixed latency per frame."""

    def __init__(self, *, frame_seconds: float, resolution: int) -> None:
        self.frame_seconds = frame_seconds
        self.resolution = resolution
        self.model_id = f"{SIM}-v{SIM_VERSION}"
        self.device = torch.device("cpu")
        self.dtype = torch.uint8
        self.lock = threading.Lock()
        self.options = EngineOptions(fuse_qkv=False, channels_last=False)
        self.compiled = False
        self.style_token = ""
        self.batches_rendered = 0
        self.frames_rendered = 0

    def check_style(self, style: StyleEmbedding) -> None:
        """Any embedding fits: there are no text encoders to match."""

    def set_style(self, style: StyleEmbedding | None) -> None:
        self.style_token = style.token if style else ""

    def compile(self, mode: str | None = None) -> None:
        self.compiled = True

    def step_split(self, params: RenderParams) -> StepSplit:
        return StepSplit(params.steps, 0)

    def recipe_settings(self) -> dict[str, bool]:
        return {}

    def auto_batch_size(self, params: RenderParams, *, max_batch: int, cpu_batch: int) -> int:
        return max(1, min(cpu_batch, max_batch))

    def render(self, prompts: list[str], seeds: list[int], params: RenderParams) -> np.ndarray:
        """uint8 images [B, H, W, 3]: a flat colour from (seed, prompt, style) with a seeded noise band."""
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError("one seed per prompt, at least one prompt")
        time.sleep(self.frame_seconds * len(prompts))
        size = self.resolution
        images = np.empty((len(prompts), size, size, 3), dtype=np.uint8)
        for image, prompt, seed in zip(images, prompts, seeds, strict=True):
            digest = hashlib.sha256(f"{seed}\0{prompt}\0{self.style_token}".encode()).digest()
            image[:] = np.frombuffer(digest[:3], dtype=np.uint8)
            band = np.random.default_rng(seed).integers(0, 256, (max(1, size // 8), size, 3), dtype=np.uint8)
            image[: band.shape[0]] = band
        self.batches_rendered += 1
        self.frames_rendered += len(prompts)
        return images
