"""The real SDXL 1.0 architecture, built in code with random weights (no hub, no download).

Used by the GPU benchmarks (style-trainer, keyframe-renderer): timings of the full-size networks need
only the architecture, not the trained weights. The config values are those of
``stabilityai/stable-diffusion-xl-base-1.0`` / ``-refiner-1.0`` (unet, vae, text_encoder, text_encoder_2,
scheduler ``config.json``), written out here so nothing has to be fetched.

    real_sdxl_base_configs()          {"unet", "vae", "text_encoder", "text_encoder_2", "scheduler"} dicts
    real_sdxl_refiner_unet_config()   the refiner UNet's config dict
    build_random_sdxl(device, dtype, with_refiner)  -> SDXLPipelines (1024 px, in memory)

The ``sdxl-random`` preset is these modules written once as a hub-layout snapshot with CLIP's real BPE
tokenizers (``dreamframe.models.snapshots``) and loaded by path. Built in memory here without
``tokenizers``, the text models get the offline byte-level tokenizer of the tiny preset (ids < 514).
"""

from __future__ import annotations

import copy

import torch

from dreamframe.models.sdxl_pipelines import (
    SDXL_RANDOM,
    SDXLPipelines,
    clip_byte_tokenizer,
    pool_at_end_of_text,
)

RESOLUTION = 1024

_BASE_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    # diffusers' historical name: these are the numbers of heads (head dim 64).
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    # 6 time ids × 256 + pooled CLIP-bigG text embedding (1280)
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_REFINER_UNET_OVERRIDES = {
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    # the refiner conditions on CLIP-bigG only
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    # 5 time ids (sizes, crop, aesthetic score) × 256 + pooled text (1280)
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_L = {  # text_encoder: OpenAI CLIP ViT-L/14 text tower
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_CLIP_BIGG = {  # text_encoder_2: OpenCLIP ViT-bigG/14 text tower with projection
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_SCHEDULER = {  # EulerDiscreteScheduler
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def real_sdxl_base_configs() -> dict[str, dict]:
    """Config dicts of SDXL 1.0 base's components (fresh copies: safe to modify)."""
    return copy.deepcopy(
        {
            "unet": _BASE_UNET,
            "vae": _VAE,
            "text_encoder": _CLIP_L,
            "text_encoder_2": _CLIP_BIGG,
            "scheduler": _SCHEDULER,
        }
    )


def real_sdxl_refiner_unet_config() -> dict:
    """Config dict of SDXL 1.0 refiner's UNet (fresh copy)."""
    return copy.deepcopy({**_BASE_UNET, **_REFINER_UNET_OVERRIDES})


def build_random_sdxl(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    with_refiner: bool = False,
    seed: int = 0,
    *,
    configs: dict[str, dict] | None = None,
    refiner_unet: dict | None = None,
    tokenizers: tuple | None = None,
) -> SDXLPipelines:
    """Full-size SDXL base (+ refiner sharing text_encoder_2 and the VAE) with random weights.

    Modules are created directly on ``device`` in ``dtype`` (random init runs there, so a GPU builds the
    3.5 B parameters in seconds). ``device="meta"`` builds shapes only (instant; for counting parameters
    and FLOPs). ``configs``/``refiner_unet`` (default: the real ones) and ``tokenizers`` (default: the
    offline byte-level pair; the snapshot writer passes CLIP's real BPE) make the same builder write the
    tiny snapshots the tests load."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dev = torch.device(device)
    configs = configs or real_sdxl_base_configs()
    refiner_config = refiner_unet or real_sdxl_refiner_unet_config()
    tokenizer, tokenizer_2 = tokenizers or (clip_byte_tokenizer(), clip_byte_tokenizer())
    if dev.type != "meta":
        torch.manual_seed(seed)
    # Created in the target dtype directly: no fp32 copy (half the memory and time).
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            te1 = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
            unet = UNet2DConditionModel(**configs["unet"])
            vae = AutoencoderKL(**configs["vae"])
            refiner = UNet2DConditionModel(**refiner_config) if with_refiner else None
    finally:
        torch.set_default_dtype(previous_dtype)
    for module in (te1, te2, unet, vae, refiner):
        if module is not None:
            module.eval().requires_grad_(False)
    scheduler = EulerDiscreteScheduler(**configs["scheduler"])
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    base.set_progress_bar_config(disable=True)
    pool_at_end_of_text(base)
    refiner_unet, refiner = refiner, None
    if refiner_unet is not None:
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=te2,
            tokenizer_2=base.tokenizer_2,
            unet=refiner_unet,
            scheduler=EulerDiscreteScheduler.from_config(scheduler.config),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
        refiner.set_progress_bar_config(disable=True)
    resolution = configs["unet"]["sample_size"] * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    return SDXLPipelines(base, refiner, SDXL_RANDOM, resolution, dev, dtype)
