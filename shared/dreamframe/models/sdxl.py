"""SDXL base + refiner presets, shared by style-trainer and keyframe-renderer.

- ``tiny``: the real diffusers/transformers classes with very small random configs (64×64 images, CPU
  seconds). Built once from a fixed seed, saved with ``save_pretrained`` into the model cache and then
  loaded back by path, so the tiny preset goes through exactly the loading code the real one does.
- ``sdxl``: SDXL 1.0 base + refiner, from hub ids or local paths (``model_paths`` in the service config).
- ``sdxl-random``: the real SDXL base + refiner architecture with random weights from a fixed seed and
  CLIP's real BPE tokenizers, written once into the model cache as a hub-layout snapshot
  (``dreamframe.models.snapshots``; built on the GPU when there is one: seconds, no download) and loaded
  by path like ``sdxl``. For benchmarks and for running the whole chain at real size without model
  weights: replicas sharing the cache load the same files, so they render alike. Its images are noise.

The refiner shares ``text_encoder_2`` and the VAE with the base pipeline (loaded once, as the reference
does), so both pipelines together hold one copy of each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from dreamframe.errors import FailedPrecondition, InvalidArgument
from dreamframe.models import build_once
from dreamframe.models.device import pick_device, pick_dtype  # noqa: F401 - callers import them from here
from dreamframe.models.sdxl_configs import build_random_sdxl

# The presets, SDXLPipelines, the tokenizer and the pooling live in sdxl_pipelines (sdxl_configs needs
# them too) and are used from here as sdxl.<name>.
from dreamframe.models.sdxl_pipelines import (
    PRESETS,
    SDXL,
    SDXL_RANDOM,
    TINY,
    SDXLPipelines,
    clip_byte_tokenizer,
    pool_at_end_of_text,
)
from dreamframe.models.snapshot_cache import snapshot_dir

HUB_IDS = {
    SDXL: ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0"),
}

# Bump when the tiny configs change, so stale caches are rebuilt instead of reused.
TINY_VERSION = 1
TINY_SEED = 1234


def build_tiny_sdxl(seed: int = TINY_SEED) -> SDXLPipelines:
    """Tiny random SDXL base + refiner in memory (fp32, CPU)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok2 = clip_byte_tokenizer(), clip_byte_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def text_config(hidden: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=projection,
            **ids,
        )

    te1 = CLIPTextModel(text_config(32, 32))
    te2 = CLIPTextModelWithProjection(text_config(48, 24))
    time_dim = 8

    def unet(cross_dim: int, n_time_ids: int) -> UNet2DConditionModel:
        return UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=8,
            cross_attention_dim=cross_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # SDXL's added conditioning: time ids (6 base, 5 refiner) × time dim + pooled text (24).
            projection_class_embeddings_input_dim=n_time_ids * time_dim + 24,
        )

    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
    )
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet(32 + 48, 6),
        scheduler=scheduler,
        add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        unet=unet(48, 5),
        scheduler=EulerDiscreteScheduler.from_config(scheduler.config),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    return SDXLPipelines(base, refiner, TINY, 64, torch.device("cpu"), torch.float32)


def quiet_progress_bars() -> None:
    """Services log progress themselves; library download/load bars would only spam the logs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers warns on every ``.to(dtype)`` of a model, even one with no modules to keep in fp32."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def read_dtype(path: str, target: torch.dtype) -> torch.dtype:
    """The dtype to read a local SDXL folder's weights in: the files' own when they are another 16-bit
    float than ``target`` (SDXL's usual fp16 files for a bf16 run), so that loading maps them as they are
    and the conversion runs on the GPU after the move, not on the CPU during the load (6 s for the base's
    7 GB on a 2-core CPU; more when every service loads at once); ``target`` otherwise."""
    weights = Path(path) / "unet" / "diffusion_pytorch_model.safetensors"
    if target.itemsize != 2 or not weights.is_file():  # a hub id, sharded or fp32-only files: as before
        return target
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    except Exception:  # unreadable or empty: from_pretrained reports it
        return target
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored, target)


def save_sdxl(pipes: SDXLPipelines, directory: Path) -> None:
    """Save both pipelines with save_pretrained: ``<dir>/base`` and ``<dir>/refiner``."""
    quiet_progress_bars()
    pipes.base.save_pretrained(directory / "base", safe_serialization=True)
    if pipes.refiner is not None:
        pipes.refiner.save_pretrained(directory / "refiner", safe_serialization=True)


def tiny_sdxl_dir(cache_dir: Path) -> Path:
    """The tiny preset on disk, built on first use. Built into a temp dir and renamed, so concurrent
    processes (several renderer replicas) never see a half-written model."""
    return build_once(
        Path(cache_dir) / f"tiny-sdxl-v{TINY_VERSION}",
        lambda tmp: save_sdxl(build_tiny_sdxl(), tmp),
        complete=lambda target: (target / "refiner" / "model_index.json").exists(),
        tmp_prefix=".tiny-sdxl-",
    )


def resolve_paths(preset: str, model_paths: dict[str, str], cache_dir: Path) -> tuple[str, str]:
    """(base, refiner) locations for a preset: the tiny cache, a configured path, or the hub ids.

    ``model_paths`` may give ``<preset>`` (a folder holding base/ and refiner/) or ``<preset>.base`` /
    ``<preset>.refiner`` separately."""
    if preset == TINY and not model_paths.get(TINY):
        root = tiny_sdxl_dir(cache_dir)
        return str(root / "base"), str(root / "refiner")
    if preset == SDXL_RANDOM and not (model_paths.get(SDXL_RANDOM) or f"{SDXL_RANDOM}.base" in model_paths):
        root = snapshot_dir(SDXL_RANDOM, cache_dir)
        return str(root / "base"), str(root / "refiner")
    if preset in model_paths:
        root = Path(model_paths[preset])
        return str(root / "base"), str(root / "refiner")
    if f"{preset}.base" in model_paths:
        return model_paths[f"{preset}.base"], model_paths.get(f"{preset}.refiner", "")
    if preset in HUB_IDS:
        return HUB_IDS[preset]
    raise InvalidArgument(
        f"unknown model preset {preset!r}; known: {', '.join(PRESETS)} or a name in model_paths",
        field="options.preset",
    )


def load_sdxl(
    preset: str,
    *,
    model_paths: dict[str, str] | None = None,
    cache_dir: Path = Path(".dreamframe/models"),
    device: str = "auto",
    dtype: torch.dtype | None = None,
    with_refiner: bool = True,
) -> SDXLPipelines:
    """Load base (+ refiner sharing text_encoder_2 and the VAE) for ``preset``, once per process."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    quiet_progress_bars()
    dev = pick_device(device)
    dt = dtype or pick_dtype(dev)
    if preset == SDXL_RANDOM and dev.type == "meta":
        return build_random_sdxl(dev, dt, with_refiner=with_refiner)  # shapes only: nothing to load
    base_path, refiner_path = resolve_paths(preset, model_paths or {}, cache_dir)
    read_dt = read_dtype(base_path, dt)
    try:
        base = StableDiffusionXLPipeline.from_pretrained(base_path, dtype=read_dt, use_safetensors=True)
        refiner = None
        if with_refiner and refiner_path:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                refiner_path,
                text_encoder_2=base.text_encoder_2,
                tokenizer_2=base.tokenizer_2,  # one vocabulary: a loaded style token reaches both
                vae=base.vae,
                dtype=read_dt,
                use_safetensors=True,
            )
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(
            f"cannot load SDXL preset {preset!r} from {base_path!r}: {exc}", field="options.preset"
        ) from exc
    pool_at_end_of_text(base)
    for pipe in (base, refiner) if refiner is not None else (base,):
        pipe.to(dev)
        if read_dt != dt:  # on the device: one kernel per tensor, where the CPU spends seconds
            with quiet_diffusers():
                pipe.to(dtype=dt)
        pipe.set_progress_bar_config(disable=True)
    resolution = 64 if preset == TINY else int(base.unet.config.sample_size) * base.vae_scale_factor
    return SDXLPipelines(base, refiner, preset, resolution, dev, dt)
