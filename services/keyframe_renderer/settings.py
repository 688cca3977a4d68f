"""The keyframe-renderer service's own settings: the ``renderer`` section
(``DREAMFRAME_RENDERER__*``, ``renderer:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from dreamframe.models.compile_cache import CompileCacheSettings


class RendererSettings(BaseModel):
    preset: str = "tiny"
    device: str = "auto"
    model_paths: dict[str, str] = Field(default_factory=dict)
    # 0 chooses from free GPU memory (capped by max_batch_size; cpu_batch_size on a CPU). On an H100,
    # batch 16 (31 GiB peak) ran 2% faster per image than batch 8.
    batch_size: int = Field(0, ge=0)
    max_batch_size: int = Field(16, ge=1)
    cpu_batch_size: int = Field(4, ge=1)
    # torch.compile the UNets (also per request with options.compile); the mode is torch.compile's.
    # "default": on an H100, max-autotune spent over 10 minutes per UNet and still picked the cuBLAS/
    # cuDNN kernels for every matmul and convolution it timed; the gain is in fusing the rest.
    compile: bool = False
    # "auto": the mode `python -m services.keyframe_renderer.warm_cache --try-max-autotune` timed fastest
    # and recorded with the compiled artifacts ("default" until one is recorded).
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "auto"
    ] = "default"
    # Compiled artifacts kept and reused across processes and pods (dreamframe.models.compile_cache):
    # a replica loads them instead of compiling; signed with a key only the compiling services hold.
    compile_cache: CompileCacheSettings = Field(default_factory=CompileCacheSettings)
    # When compiling, also compile the VAE decoder (one call per batch, at full resolution: eager it ran
    # at 103 TFLOP/s on an H100 while the UNets ran at ~350).
    compile_vae: bool = True
    # diffusers' inductor settings for SDXL on top of conv_1x1_as_mm (always on when compiling):
    # coordinate-descent tuning of the Triton kernels in all directions, no epilogue fusion. Longer
    # compiles; passed to our torch.compile calls only.
    compile_tuning: bool = False
    # Compile per UNet transformer block (each shape traced once, shared by every block of it) instead
    # of per UNet: less to trace at every replica start; not yet timed against whole-UNet compiling.
    compile_regional: bool = False
    # Compile each UNet (and the VAE decoder) ahead of time per input shape and keep the functions in the
    # compile cache: a replica that finds them loads them instead of tracing (dreamframe.models.aot;
    # PyTorch's experimental aot_compile). Not with compile_regional. Off: on an H200 it halved a
    # replica's start, but whether it renders as fast as just in time is not yet settled (README).
    compile_aot: bool = False
    # Fused QKV projections (one matmul for q, k, v; one for k, v in cross-attention) in both UNets and
    # the VAE (diffusers' fuse_qkv_projections; the old projections become views of the fused weights).
    fuse_qkv: bool = True
    # The SDPA kernel preferred in the UNets while denoising. "auto": PyTorch's own choice; the others
    # go first in PyTorch's priority order, which falls back where that kernel can't run the shapes.
    sdpa_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"
    # channels-last memory format for UNets and VAE on GPUs (faster convolutions on tensor cores).
    channels_last: bool = True
    # FP8 matmuls (e4m3, per-row scales: dreamframe.models.fp8) for the UNets' attention-block linear
    # layers, on GPUs with FP8 tensor cores (compute capability ≥ 8.9); ignored elsewhere, with a warning.
    fp8: bool = False
    # Threads encoding and storing PNGs while the GPU renders the next batch (PNG encoding releases the
    # GIL); more shorten the wait for the last batch's writes.
    writer_threads: int = Field(4, ge=1)
    # Presets kept loaded at once (least recently used ones are dropped to make room).
    max_loaded_presets: int = Field(2, ge=1)
    # Load the default preset at startup, so readiness means "can render now".
    preload: bool = True
    # The "sim" preset (a simulated GPU for control-plane tests and benchmarks): seconds per frame and
    # the side of its small deterministic images.
    sim_frame_seconds: float = Field(0.05, ge=0)
    sim_resolution: int = Field(32, ge=8, le=1024)
