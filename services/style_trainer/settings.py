"""The style-trainer service's own settings: the ``style`` section
(``DREAMFRAME_STYLE__*``, ``style:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from dreamframe.models.compile_cache import CompileCacheSettings


class StyleSettings(BaseModel):
    preset: str = "tiny"
    device: str = "auto"
    # Where real model weights are (a local path or hub id) per preset name.
    model_paths: dict[str, str] = Field(default_factory=dict)
    # Load the default preset at startup and, with compile on, train one step of a default request on a
    # placeholder image (health says SERVING once both are done: the compile is not the first job's).
    preload: bool = True
    # Save a resumable checkpoint every N optimizer steps when the request leaves it at 0.
    checkpoint_every: int = Field(50, ge=0)
    # torch.compile the UNet for training (GPU): minutes once per process, ~2.5x faster passes after.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "reduce-overhead"
    )
    # Compile the two text encoders too (None: with compile).
    compile_text_encoders: bool | None = None
    # Compiled artifacts kept and reused across processes and pods (dreamframe.models.compile_cache): the
    # first training of a new process loads them instead of compiling.
    compile_cache: CompileCacheSettings = Field(default_factory=CompileCacheSettings)
    # The UNet in channels-last memory format (None: on GPUs).
    channels_last: bool | None = False
    # Read training losses to the host once per this many steps (None: 10 on GPUs, 1 on CPUs).
    loss_read_every: int | None = Field(None, ge=1, le=1000)
    # Scaled-dot-product attention kernels ("auto": PyTorch's choice).
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
