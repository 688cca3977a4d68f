"""The model side of training: precision, what is trainable, LoRA, activation checkpointing, FSDP2
sharding, the optimizer, and the final Hugging Face export.

What trains (as LLaVA-1.5 and LLaMA-VID fine-tune): the vision tower stays frozen. ``full`` trains the
projector and the whole language model; ``lora`` trains LoRA adapters on every linear layer of the
language model plus the projector (peft ``modules_to_save``).

Sharding (FSDP2 ``fully_shard``): each language-model decoder layer is its own unit, everything else
(vision tower, projector, embeddings, head) belongs to the root unit. The vision tower is not split into
units of its own on purpose: a micro-batch without images on one rank would then skip collectives
the other ranks run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .spec import Hyperparameters, Method

# Linear layers of a Llama-style language model that LoRA adapts.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR = "multi_modal_projector"


@dataclass(frozen=True)
class Precision:
    # dtype frozen base weights are stored in (trainable ones are always fp32 master weights)
    frozen_dtype: torch.dtype
    # dtype matmuls run in (FSDP casts parameters to it; autocast covers the rest)
    compute_dtype: torch.dtype

    @property
    def autocast(self) -> bool:
        return self.compute_dtype != torch.float32


def pick_precision(device: torch.device, setting: str, method: Method) -> Precision:
    """bf16 compute on GPUs (LoRA also keeps the frozen base in bf16: half the memory); fp32 on CPUs."""
    if setting == "auto":
        setting = "bf16" if device.type == "cuda" else "fp32"
    if setting == "fp32":
        return Precision(torch.float32, torch.float32)
    if setting != "bf16":
        raise ValueError(f"unknown precision {setting!r}; use auto, bf16 or fp32")
    return Precision(torch.bfloat16 if method is Method.LORA else torch.float32, torch.bfloat16)


def load_base_model(path: str, dtype: torch.dtype):
    from dreamframe.models import video_llm

    model = video_llm.load_model(path, device="cpu", dtype=dtype)
    model.config.use_cache = model.config.text_config.use_cache = False
    return model


def lora_config(hp: Hyperparameters):
    from peft import LoraConfig

    return LoraConfig(
        r=hp.lora_rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=[PROJECTOR],
    )


def enable_activation_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def turn_on_activation_checkpointing(model) -> None:
    """On a model already made trainable (LoRA-wrapped or not, maybe sharded): the transformers model
    inside recomputes each decoder layer's activations in the backward pass from now on."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable_activation_checkpointing(inner)
    model.train()


def make_trainable(model, method: Method, hp: Hyperparameters, precision: Precision):
    """Freeze what stays frozen, wrap with LoRA if asked; trainable parameters become fp32."""
    model.requires_grad_(False)
    if method is Method.LORA:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(hp), autocast_adapter_dtype=True)
    else:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        getattr(model.model, PROJECTOR).requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def shard(
    model, device: torch.device, world_size: int, precision: Precision, *, compile_layers: bool = False
):
    """FSDP2 over all ranks: one unit per language-model decoder layer, the rest in the root unit.
    ``compile_layers`` compiles each decoder layer (torch.compile fuses its norm/rotary/activation
    elementwise work; identical layers share one compiled graph)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=precision.compute_dtype, reduce_dtype=torch.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    if compile_layers:
        # Before the first compiled call: load this model's compiled layers if another process made them.
        model._compile_cache_session = compile_cache_session(base, device, world_size, precision)
    for name, module in model.named_modules():
        if type(module).__name__ in layer_classes and "language_model" in name:
            if compile_layers:
                module.compile()
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


COMPILE_CACHE_SERVICE = "trainer"
_compile_cache = None


def trainer_compile_cache():
    """The trainer's compile cache (dreamframe.models.compile_cache), opened once per worker process
    from the settings it inherits (trainer.compile_cache, models.cache_dir, storage); only rank 0
    saves, every rank loads."""
    global _compile_cache
    if _compile_cache is None:
        import os

        from dreamframe.models.compile_cache import open_service_cache

        _compile_cache = open_service_cache(
            "trainer", COMPILE_CACHE_SERVICE, save=os.environ.get("RANK", "0") == "0"
        )
    return _compile_cache


def compile_cache_session(base, device: torch.device, world_size: int, precision: Precision):
    """The compile-cache lookup for this model's compiled decoder layers (None when the cache is off).
    Keyed by the model's config, whether it is LoRA-wrapped, precision, world size and the device."""
    from dreamframe.models.compile_cache import config_hash

    cache = trainer_compile_cache()
    if not cache.enabled:
        return None
    config = getattr(base, "config", None)
    model = {
        "architecture": type(base).__name__,
        "configs": config_hash(config.to_dict() if config is not None else {}),
        # LoRA or full, and which layers train, change the backward graphs.
        "trainable": config_hash({"names": [n for n, p in base.named_parameters() if p.requires_grad]}),
    }
    options = {
        "compile": "layers",
        "frozen_dtype": str(precision.frozen_dtype),
        "compute_dtype": str(precision.compute_dtype),
        "world_size": world_size,
        "checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
    }
    return cache.session(cache.key(model=model, options=options, device=device))


def finish_compile_cache(model) -> None:
    """After the first optimizer step (forward and backward compiled): save what compiled, if new."""
    session = getattr(model, "_compile_cache_session", None)
    if session is not None and not session.finished:
        session.finish()


def prepare_model(
    base,
    method: Method,
    hp: Hyperparameters,
    *,
    device: torch.device,
    world_size: int,
    precision: Precision,
    compile_layers: bool = False,
):
    """Base model (a path, or a model already built) → trainable (LoRA or full) → checkpointed →
    sharded on ``device`` (decoder layers optionally compiled)."""
    model = load_base_model(base, precision.frozen_dtype) if isinstance(base, str | Path) else base
    model.config.use_cache = model.config.text_config.use_cache = False
    if hp.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model = make_trainable(model, method, hp, precision)
    model = shard(model, device, world_size, precision, compile_layers=compile_layers)
    model.train()
    return model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (global sizes, also when sharded)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def build_optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and norm weights (1-D parameters)."""
    params = trainable_parameters(model)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=(0.9, 0.999))
    if getattr(model, "_compile_cache_session", None) is not None:
        # The compile is lazy: the first step has compiled forward and backward; save them then.
        optimizer.register_step_post_hook(lambda *_: finish_compile_cache(model))
    return optimizer


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    from transformers import get_cosine_schedule_with_warmup

    warmup = math.ceil(total_steps * warmup_ratio)
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def export_dtype(config) -> torch.dtype:
    """The dtype the final model is exported in: the base checkpoint's."""
    dtype = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def export_final(
    path: str,
    method: Method,
    hp: Hyperparameters,
    trainable_state: dict[str, torch.Tensor],
    processor,
    dest: Path,
    *,
    adapter_dest: Path | None = None,
) -> None:
    """The trained model as a plain Hugging Face Llava checkpoint in ``dest`` (LoRA merged into the
    weights, so ``from_pretrained`` needs nothing else), in the base checkpoint's dtype; with LoRA the
    adapter alone also goes to ``adapter_dest``. Runs on one process, on CPU."""
    from transformers import AutoConfig

    dtype = export_dtype(AutoConfig.from_pretrained(path))
    model = load_base_model(path, torch.float32)
    if method is Method.LORA:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(hp))
        _load_trainable(model, trainable_state)
        if adapter_dest is not None:
            model.save_pretrained(adapter_dest, safe_serialization=True)
        model = model.merge_and_unload()
    else:
        _load_trainable(model, trainable_state)
    model.config.use_cache = True
    model.to(dtype).save_pretrained(dest, safe_serialization=True)
    processor.save_pretrained(dest)


def _load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"trained weights do not fit the model: unexpected {result.unexpected_keys[:5]}")
