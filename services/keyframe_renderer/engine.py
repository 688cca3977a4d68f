"""The GPU part: SDXL base + refiner over a batch of prompts, latents handed over, one batched VAE decode.

What makes it fast (DESIGN.md, "GPU work is fast by design"):
- a batch of B prompts per pipeline call, one ``torch.Generator`` per frame (seeded ``seed_offset + i``)
  so a frame's noise — and so its image — does not depend on the batch it lands in;
- prompt embeddings computed once per batch with the base's two encoders; the refiner gets the
  text_encoder_2 half of the same tensors (it conditions on that encoder only), the negative prompt's
  embeddings are computed once and reused by every batch;
- the base stops at ``high_noise_fraction`` and hands its latents to the refiner (``output_type="latent"``:
  no decode/encode in between); the whole batch is decoded by the VAE in one call, converted to uint8
  on the device, and copied to the host once per batch;
- bf16 weights on GPUs, PyTorch SDPA attention (diffusers' ``AttnProcessor2_0`` or, with fused QKV
  projections, ``FusedAttnProcessor2_0``; checked at load) with a selectable preferred kernel,
  channels-last UNets/VAE, cuDNN's convolution autotuning, optional ``torch.compile`` of both UNets and
  the VAE decoder (with our inductor settings passed to those compiles only, never set globally);
- optionally (``fp8``, off by default) FP8 matmuls with per-row scales for the UNets' attention-block
  linear layers, on GPUs with FP8 tensor cores (``quantize_unet``; the change goes into frame recipes);
- no host synchronisation inside the denoising loop: no step callbacks, device-side generators (a CPU
  generator would copy noise to the GPU every Euler step), the scheduler keeps its sigmas on the host.
  The benchmark counts the syncs that remain: all at pipeline set-up (diffusers' step split for
  ``denoising_end``/``denoising_start``, input copies) plus the one device→host copy per batch.

The speed-ups are ``EngineOptions`` (from ``RendererSettings``); ``configure`` switches them on a loaded
engine (the benchmark compares settings on one set of weights). Device time per stage (text encoding,
base, refiner, decode) is recorded with CUDA events at the stage boundaries (no host syncs) into
``stage_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamframe.errors import InvalidArgument
from dreamframe.models import aot, attention, fp8, sdxl
from dreamframe.models.attention import sdpa_context
from dreamframe.models.compile_cache import CompileCache, Session, config_hash, open_cache
from dreamframe.models.device import free_memory
from services.keyframe_renderer.settings import RendererSettings

from .options import RenderParams
from .style import StyleEmbedding, StyleSlot, check_fits

log = logging.getLogger(__name__)

SDPA_PROCESSORS = frozenset({"AttnProcessor2_0", "FusedAttnProcessor2_0"})
# Activation memory per output pixel at 2-byte precision (UNet with CFG is small next to the VAE
# decoder's full-resolution 128/256-channel feature maps). About 2 GiB per 1024×1024 image; the
# benchmark measures the real figure ("peak_bytes_per_image").
BYTES_PER_PIXEL_BF16 = 2048
MEMORY_HEADROOM = 2 << 30


COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "auto")
# "auto": the mode a warm-up (warm_cache) timed fastest and recorded in the compile cache; "default" when
# it recorded none.
AUTO_FALLBACK_MODE = "default"
SDPA_BACKENDS = attention.BACKENDS
STAGES = ("encode", "base", "refiner", "decode")
# Inductor settings for our torch.compile calls (passed as their ``options``, so nothing global changes).
# SDXL's many 1×1 convolutions as matmuls: always, when compiling.
INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True}
# diffusers' further advice for SDXL ("compile_tuning"): tunes every Triton kernel's launch config, so
# compiles take longer.
INDUCTOR_TUNING = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs its loaded weights (``RendererSettings`` names the same fields)."""

    # "" = eager; otherwise a torch.compile mode for both UNets (and the VAE decoder with compile_vae);
    # "auto": the compile cache's recorded winner.
    compile_mode: str = ""
    compile_vae: bool = True
    compile_tuning: bool = False
    # Compile each UNet transformer block instead of each whole UNet: blocks of one shape share one
    # compiled graph, so a process traces a few blocks instead of ~70 (Dynamo's tracing is what a
    # replica pays on every start, cache or not); the ResNet blocks and the rest run eager.
    compile_regional: bool = False
    # Compile each module's forward ahead of time per input shape and keep the function in the compile
    # cache (dreamframe.models.aot): a process that finds it there neither traces nor lowers.
    compile_aot: bool = False
    fuse_qkv: bool = True
    sdpa_backend: str = "auto"
    channels_last: bool = True
    # FP8 (e4m3, per-row scales) for the UNets' attention-block linear layers, where the GPU has FP8
    # tensor cores (dreamframe.models.fp8); elsewhere the engine runs without and says so.
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode: must be one of {', '.join(repr(m) for m in COMPILE_MODES)} "
                f"('' = not compiled), got {self.compile_mode!r}"
            )
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(
                f"sdpa_backend: must be one of {', '.join(SDPA_BACKENDS)}, got {self.sdpa_backend!r}"
            )
        for f in fields(self):
            if f.type in (bool, "bool") and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name}: must be true or false, got {getattr(self, f.name)!r}")
        if self.compile_aot and self.compile_regional:
            raise ValueError(
                "compile_aot: compiles whole modules; it cannot be combined with compile_regional"
            )

    @classmethod
    def from_settings(cls, settings: RendererSettings, *, compile: bool | None = None) -> EngineOptions:
        """The engine options the service runs with (``compile`` overrides ``settings.compile``)."""
        compiled = settings.compile if compile is None else compile
        return cls(
            compile_mode=settings.compile_mode if compiled else "",
            compile_vae=settings.compile_vae,
            compile_tuning=settings.compile_tuning,
            compile_regional=settings.compile_regional,
            compile_aot=settings.compile_aot,
            fuse_qkv=settings.fuse_qkv,
            sdpa_backend=settings.sdpa_backend,
            channels_last=settings.channels_last,
            fp8=settings.fp8,
        )

    def describe(self) -> str:
        compiled = (
            f"compile {self.compile_mode}"
            + (" per transformer block" if self.compile_regional else "")
            + (" ahead of time" if self.compile_aot else "")
            + (" +VAE" if self.compile_vae else " (UNets only)")
            + (" +tuning" if self.compile_tuning else "")
            if self.compile_mode
            else "eager"
        )
        return (
            f"{compiled}, {'fused' if self.fuse_qkv else 'unfused'} QKV, SDPA {self.sdpa_backend}, "
            f"{'channels-last' if self.channels_last else 'contiguous'}"
            + (", FP8 linears" if self.fp8 else "")
        )


def inductor_options(mode: str, *, tuning: bool) -> dict[str, Any]:
    """torch.compile ``options`` for ``mode`` plus our inductor settings (``mode`` and ``options``
    can't both be given to torch.compile, so the mode goes in as its option list)."""
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode or "default"))
    options.update(INDUCTOR_OPTIONS)
    if tuning:
        options.update(INDUCTOR_TUNING)
    return options


def set_fused_qkv(model: torch.nn.Module, fused: bool) -> None:
    """diffusers' fused QKV projections on ``model`` (a UNet or the VAE), or back to separate ones.

    Fusing builds ``to_qkv`` (self-attention) / ``to_kv`` (cross-attention) from the separate weights;
    the separate projections then become views into the fused weights, so both ways share one copy
    (no extra memory) and switching back is only a change of attention processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    if not fused:
        model.set_attn_processor(AttnProcessor2_0())
        return
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        for attn in attentions:
            if getattr(attn, "fused_projections", False):
                continue
            attn.fuse_projections(fuse=True)
            if attn.is_cross_attention:
                fused_layer, parts = attn.to_kv, (attn.to_k, attn.to_v)
            else:
                fused_layer, parts = attn.to_qkv, (attn.to_q, attn.to_k, attn.to_v)
            start = 0
            for part in parts:
                rows = part.weight.shape[0]
                part.weight.data = fused_layer.weight.data[start : start + rows]
                if part.bias is not None and fused_layer.bias is not None:
                    part.bias.data = fused_layer.bias.data[start : start + rows]
                start += rows
    model.set_attn_processor(FusedAttnProcessor2_0())


def _fused_parts(unet: torch.nn.Module):
    """(attention name, module, fused layer name, separate layer names) for each attention whose
    projections are fused: the separate ones are views into the fused weights, unused while fused."""
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention) and getattr(module, "fused_projections", False):
            if module.is_cross_attention:
                yield name, module, "to_kv", ("to_k", "to_v")
            else:
                yield name, module, "to_qkv", ("to_q", "to_k", "to_v")


def fp8_linears(unet: torch.nn.Module) -> fp8.LinearFilter:
    """Which of a UNet's linear layers go FP8: those in its attention blocks (projections in/out,
    attention projections, feed-forward), where almost all its matmul FLOPs are; not the separate
    projections fused QKV leaves unused (``quantize_unet`` makes those views of the fused FP8 layer)."""
    unused = {f"{name}.{part}" for name, _, _, parts in _fused_parts(unet) for part in parts}
    return lambda name, _layer: ".attentions." in f".{name}." and name not in unused


def quantize_unet(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """FP8 linears in ``unet`` (``fp8_linears``); returns the layers replaced, by name. The separate
    q/k/v projections of fused attentions become row views of the fused FP8 layer, as they were of the
    bf16 one: otherwise their views would keep the whole bf16 fused weights alive."""
    originals = fp8.quantize_linears(unet, fp8_linears(unet))
    for name, attn, fused_name, parts in _fused_parts(unet):
        fused = getattr(attn, fused_name)
        if not isinstance(fused, fp8.Float8Linear):
            continue
        start = 0
        for part in parts:
            layer = getattr(attn, part)
            originals[f"{name}.{part}"] = layer
            setattr(attn, part, fused.rows(start, start + layer.out_features))
            start += layer.out_features
    return originals


@dataclass(frozen=True)
class StepSplit:
    """How a schedule of ``steps`` divides between base and refiner."""

    base: int
    refiner: int


class SDXLEngine:
    """One loaded preset, ready to render batches. Not thread-safe: hold ``lock`` around use."""

    def __init__(
        self,
        pipes: sdxl.SDXLPipelines,
        *,
        model_id: str,
        options: EngineOptions | None = None,
        reversible: bool = False,
        compile_cache: CompileCache | None = None,
    ) -> None:
        """``reversible``: keep the bf16 weights that FP8 replaces, so ``configure`` can switch FP8 (or
        anything it depends on) off again; the benchmark compares settings this way. Costs their memory.
        ``compile_cache``: where compiled artifacts are loaded from and saved to (none: compile anew)."""
        self.pipes = pipes
        self.compile_cache = compile_cache or CompileCache.disabled("keyframe-renderer")
        # Compile-cache sessions by workload (batch, size, guidance, refiner): one lookup per shape.
        self._cache_sessions: dict[tuple, Session] = {}
        self.base = pipes.base
        self.refiner = pipes.refiner
        self.device = pipes.device
        self.dtype = pipes.dtype
        self.resolution = pipes.resolution
        self.model_id = model_id
        # A plain Lock (not RLock): a generator holding it may be closed from another thread.
        self.lock = threading.Lock()
        self.style = StyleSlot(self.base)
        self.options = EngineOptions(fuse_qkv=False, channels_last=False)  # as loaded
        self.compiled = False
        self._compiled_modules: list[torch.nn.Module] = []
        self._aot_runners: list[aot.AheadOfTime] = []
        self.reversible = reversible
        # Per UNet, the linear layers FP8 replaced (empty dicts when not reversible); None: not quantized.
        self._fp8_originals: list[dict[str, torch.nn.Linear]] | None = None
        self._negative: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._splits: dict[tuple[int, float], StepSplit] = {}
        self._batch_sizes: dict[tuple[int, int, int, int], int] = {}
        self.batches_rendered = 0
        self.frames_rendered = 0
        # Device seconds per stage over every batch since the last reset_stage_seconds().
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)
        for pipe in self._pipes():
            pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cuda":
            # Shapes repeat batch after batch: let cuDNN time its convolution algorithms once per shape.
            torch.backends.cudnn.benchmark = True
        self.attention = check_sdpa(self._pipes())
        self.configure(options or EngineOptions())

    def _pipes(self):
        return [p for p in (self.base, self.refiner) if p is not None]

    def _models(self) -> list[torch.nn.Module]:
        """Both UNets and the (shared) VAE, each once."""
        return [p.unet for p in self._pipes()] + [self.base.vae]

    @property
    def compile_mode(self) -> str:
        return self.options.compile_mode

    def configure(self, options: EngineOptions) -> None:
        """Apply ``options`` to the loaded weights (undoing a previous compile first)."""
        self.uncompile()
        use_fp8 = options.fp8 and self._fp8_available()
        layout = (options.channels_last, options.fuse_qkv)
        if self._fp8_originals is not None and (
            not use_fp8 or layout != (self.options.channels_last, self.options.fuse_qkv)
        ):
            self._unquantize()  # layout changes work on the bf16 weights
        channels_last = options.channels_last and self.device.type == "cuda"
        if channels_last != (self.options.channels_last and self.device.type == "cuda"):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            for model in self._models():
                model.to(memory_format=fmt)
        if options.fuse_qkv != self.options.fuse_qkv:
            for model in self._models():
                set_fused_qkv(model, options.fuse_qkv)
        if use_fp8 and self._fp8_originals is None:
            self._quantize()
        self.options = replace(options, compile_mode="", fp8=use_fp8)
        self.attention = check_sdpa(self._pipes())
        if options.compile_mode:
            self.compile(options.compile_mode)
        log.info("engine: %s", self.options.describe())

    def recipe_settings(self) -> dict[str, bool]:
        """Engine settings that change pixels beyond rounding, for frame recipes: FP8 linears (only when
        on, so frames rendered before the setting existed keep matching)."""
        return {"fp8_linears": True} if self.options.fp8 else {}

    def _fp8_available(self) -> bool:
        reason = fp8.unavailable_reason(self.device)
        if reason:
            log.warning("FP8 linears requested but off: %s", reason)
        return reason is None

    def _quantize(self) -> None:
        originals = [quantize_unet(p.unet) for p in self._pipes()]
        log.info("FP8 linears: %d layers", sum(len(o) for o in originals))
        self._fp8_originals = originals if self.reversible else [{} for _ in originals]

    def _unquantize(self) -> None:
        if not self.reversible:
            raise ValueError(
                "fp8: this engine dropped its bf16 weights when it went FP8; load it again to switch "
                "FP8, channels-last or fused QKV (or build it with reversible=True)"
            )
        for pipe, originals in zip(self._pipes(), self._fp8_originals or [], strict=True):
            fp8.restore_linears(pipe.unet, originals)
        self._fp8_originals = None

    def _compile_targets(self) -> dict[str, torch.nn.Module]:
        if self.options.compile_regional:
            from diffusers.models.attention import BasicTransformerBlock

            targets = {
                f"{p_name}.{name}": m
                for p_name, p in zip(("base", "refiner"), self._pipes(), strict=False)
                for name, m in p.unet.named_modules()
                if isinstance(m, BasicTransformerBlock)
            }
        else:
            targets = {
                f"{name}_unet": p.unet for name, p in zip(("base", "refiner"), self._pipes(), strict=False)
            }
        if self.options.compile_vae:
            targets["vae_decoder"] = self.base.vae.decoder
        return targets

    def compile(self, mode: str | None = None) -> None:
        """torch.compile both UNets (and the VAE decoder) in place; the first batch of each shape pays
        the compile time, or loads it from the compile cache. ``auto``: the mode the cache recorded as
        the fastest for this model and these options (``warm_cache``)."""
        if self.compiled:
            return
        mode = mode or self.options.compile_mode or "default"
        if mode == "auto":
            mode = self.auto_mode()
        self.options = replace(self.options, compile_mode=mode)
        options = inductor_options(mode, tuning=self.options.compile_tuning)
        targets = self._compile_targets()
        self._compiled_modules = list(targets.values())
        if self.options.compile_aot and not aot.available():
            log.warning("compile_aot: this torch (%s) cannot compile ahead of time; off", torch.__version__)
            self.options = replace(self.options, compile_aot=False)
        for name, module in targets.items():
            if self.options.compile_aot:
                runner = aot.AheadOfTime(
                    module, name, options=options, artifact_key=self.aot_key, cache=self.compile_cache
                )
                runner.install()
                self._aot_runners.append(runner)
            else:
                module.compile(fullgraph=True, options=options)
        self.compiled = True
        log.info("compiled %s", self.options.describe())

    def uncompile(self) -> None:
        """Back to eager modules, dropping every compiled graph (used when options change)."""
        if not self.compiled:
            return
        for module in self._compiled_modules:
            aot.uninstall(module)  # what nn.Module.compile or AheadOfTime.install set
        self._compiled_modules = []
        self._aot_runners = []
        torch._dynamo.reset()
        self._cache_sessions.clear()
        self.compiled = False
        self.options = replace(self.options, compile_mode="")

    # --- compile cache -------------------------------------------------------------------------------
    def cache_model(self) -> dict[str, Any]:
        """The model part of a compile-cache key: the preset and a hash of every compiled module's
        config (both UNets, the VAE), with the dtype."""
        configs = [p.unet.config for p in self._pipes()] + [self.base.vae.config]
        return {
            "preset": self.pipes.preset,
            "configs": config_hash(*configs),
            "refiner": self.refiner is not None,
            "dtype": str(self.dtype),
        }

    def cache_options(self, mode: str | None = None) -> dict[str, Any]:
        """The options part of a key: the engine options and the inductor options they compile with."""
        mode = self.options.compile_mode if mode is None else mode
        options = {f.name: getattr(self.options, f.name) for f in fields(self.options)}
        options["compile_mode"] = mode
        if mode and mode != "auto":
            options["inductor"] = inductor_options(mode, tuning=self.options.compile_tuning)
        return options

    def cache_key(self, workload: dict[str, Any], mode: str | None = None) -> str:
        return self.compile_cache.key(
            model=self.cache_model(), options=self.cache_options(mode), workload=workload, device=self.device
        )

    def aot_key(self, module: str, inputs: str) -> str:
        """Where ``module``'s function compiled ahead of time for ``inputs`` (a signature) is kept."""
        workload = {"module": module, "inputs": inputs}
        return self.compile_cache.key(
            model=self.cache_model(), options=self.cache_options(), workload=workload, device=self.device
        )

    def choice_key(self) -> str:
        """Where warm-up records the fastest compile mode: the key without mode or shapes."""
        return self.compile_cache.key(
            model=self.cache_model(), options=self.cache_options("auto"), device=self.device
        )

    def auto_mode(self) -> str:
        choice = self.compile_cache.choice(self.choice_key()) or {}
        mode = choice.get("mode")
        if mode not in COMPILE_MODES or mode in ("", "auto"):
            log.info("compile_mode auto: no recorded choice, using %s", AUTO_FALLBACK_MODE)
            return AUTO_FALLBACK_MODE
        log.info("compile_mode auto: %s (recorded by warm-up: %s)", mode, choice.get("seconds_per_image"))
        return mode

    @staticmethod
    def workload(batch: int, params: RenderParams, refine: bool) -> dict[str, Any]:
        """What decides the compiled graphs' shapes (not seeds, steps or prompts)."""
        return {
            "batch": batch,
            "width": params.width,
            "height": params.height,
            "guided": params.guidance_scale > 1.0,
            "refiner": refine,
        }

    def _cache_session(self, workload: dict[str, Any]) -> Session | None:
        """Before the first compiled batch of a shape: its compile-cache lookup (loads a hit)."""
        if not (self.compiled and self.compile_cache.enabled):
            return None
        shape = tuple(sorted(workload.items()))
        session = self._cache_sessions.get(shape)
        if session is None:
            session = self._cache_sessions[shape] = self.compile_cache.session(
                self.cache_key(workload), workload=workload, mode=self.options.compile_mode
            )
        return session

    def reset_stage_seconds(self) -> None:
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    # --- style ----------------------------------------------------------------------------------------
    def check_style(self, style: StyleEmbedding) -> None:
        """INVALID_ARGUMENT unless the embedding's rows fit this model's two text encoders."""
        check_fits(style, self.base)

    def set_style(self, style: StyleEmbedding | None) -> None:
        if self.style.apply(style):
            self._negative.clear()  # encoder weights changed

    # --- schedule -------------------------------------------------------------------------------------
    def step_split(self, params: RenderParams) -> StepSplit:
        """Base and refiner step counts, as diffusers will run them (both must be at least one)."""
        if not params.use_refiner or self.refiner is None:
            return StepSplit(params.steps, 0)
        key = (params.steps, params.high_noise_fraction)
        split = self._splits.get(key)
        if split is None:
            scheduler = type(self.base.scheduler).from_config(self.base.scheduler.config)
            scheduler.set_timesteps(params.steps, device="cpu")
            train_steps = scheduler.config.num_train_timesteps
            cutoff = int(round(train_steps - params.high_noise_fraction * train_steps))
            base = int((scheduler.timesteps >= cutoff).sum())
            split = self._splits[key] = StepSplit(base, len(scheduler.timesteps) - base)
        if split.base == 0 or split.refiner == 0:
            raise InvalidArgument(
                f"{params.steps} steps at high_noise_fraction {params.high_noise_fraction} leave "
                f"{split.base} base and {split.refiner} refiner steps; both need at least one",
                field="options.steps",
            )
        return split

    # --- rendering ------------------------------------------------------------------------------------
    def auto_batch_size(self, params: RenderParams, *, max_batch: int, cpu_batch: int) -> int:
        """Chosen once per size and kept: free memory differs from call to call (compiled graphs, the
        allocator's reserve), and a batch size that followed it would be a new shape to compile."""
        key = (params.width, params.height, max_batch, cpu_batch)
        size = self._batch_sizes.get(key)
        if size is None:
            size = auto_batch_size(self.device, params.width, params.height, self.dtype, max_batch, cpu_batch)
            self._batch_sizes[key] = size
        return size

    def generators(self, seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    def _negative_embeds(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._negative.get(text)
        if cached is None:
            embeds, _, pooled, _ = self.base.encode_prompt(
                text, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            cached = self._negative[text] = (embeds, pooled)
        return cached

    @torch.inference_mode()
    def render(self, prompts: list[str], seeds: list[int], params: RenderParams) -> np.ndarray:
        """Render one batch; returns uint8 images [B, H, W, 3] on the host."""
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError("one seed per prompt, at least one prompt")
        split = self.step_split(params)
        batch = len(prompts)
        guided = params.guidance_scale > 1.0
        marks = [self._mark()]
        embeds, _, pooled, _ = self.base.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        negative = negative_pooled = None
        if guided:
            neg, neg_pooled = self._negative_embeds(params.negative_prompt)
            negative, negative_pooled = neg.expand(batch, -1, -1), neg_pooled.expand(batch, -1)
        generators = self.generators(seeds)
        session = self._cache_session(self.workload(batch, params, split.refiner > 0))
        common = dict(
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=generators,
            output_type="latent",
        )
        refine = split.refiner > 0
        marks.append(self._mark())
        with sdpa_context(self.options.sdpa_backend):
            latents = self.base(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                height=params.height,
                width=params.width,
                denoising_end=params.high_noise_fraction if refine else None,
                **common,
            ).images
            marks.append(self._mark())
            if refine:
                # The refiner conditions on text_encoder_2 only: the last d2 features of the base's
                # embeddings.
                d2 = self.base.text_encoder_2.config.hidden_size
                latents = self.refiner(
                    prompt_embeds=embeds[..., -d2:],
                    negative_prompt_embeds=None if negative is None else negative[..., -d2:],
                    pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=negative_pooled,
                    image=latents,
                    denoising_start=params.high_noise_fraction,
                    **common,
                ).images
        marks.append(self._mark())
        pixels = self._decode_on_device(latents)
        marks.append(self._mark())
        images = pixels.cpu().numpy()  # the one host copy (and sync) per batch
        if session is not None and not session.finished:
            # The first compiled batch of this shape is done: save what it compiled.
            session.finish(compiled_ahead=any(r.compiled for r in self._aot_runners))
        self._add_stage_seconds(marks)
        self.batches_rendered += 1
        self.frames_rendered += batch
        return images

    def _add_stage_seconds(self, marks: list) -> None:
        for stage, (start, end) in zip(STAGES, zip(marks[:-1], marks[1:], strict=True), strict=True):
            if self.device.type == "cuda":
                seconds = start.elapsed_time(end) / 1e3  # both recorded before the host copy: done
            else:
                seconds = end - start
            self.stage_seconds[stage] += seconds

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """One VAE decode for the whole batch; uint8 conversion on the device, one copy to the host."""
        return self._decode_on_device(latents).cpu().numpy()

    def _decode_on_device(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.base.vae
        config = vae.config
        latents = latents.to(vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
        if self.options.channels_last and latents.device.type == "cuda":
            latents = latents.contiguous(memory_format=torch.channels_last)
        pixels = vae.decode(latents, return_dict=False)[0]
        pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous()


def check_sdpa(pipes) -> str:
    """Every attention layer must run PyTorch SDPA (flash/memory-efficient kernels); returns its name."""
    names: set[str] = set()
    for pipe in pipes:
        for module in (pipe.unet, pipe.vae):
            names |= {type(p).__name__ for p in module.attn_processors.values()}
    if not names <= SDPA_PROCESSORS:
        raise RuntimeError(f"attention processors {sorted(names)} are not PyTorch SDPA")
    return ",".join(sorted(names))


def auto_batch_size(
    device: torch.device, width: int, height: int, dtype: torch.dtype, max_batch: int, cpu_batch: int
) -> int:
    """Frames per batch from free GPU memory and a per-image activation model; fixed on a CPU. On a GPU
    a power of two, so the coordinator's shards (render_shard_size 64) are whole batches and a compiled
    renderer pads only the last batch of a story (see Renderer.render)."""
    if device.type != "cuda":
        return max(1, min(cpu_batch, max_batch))
    free = free_memory(device)  # the device's free memory, within this process's GPU budget
    per_image = BYTES_PER_PIXEL_BF16 * width * height * max(1, torch.finfo(dtype).bits // 16)
    fits = int(max(1, min(max_batch, (free - MEMORY_HEADROOM) // per_image)))
    return 1 << (fits.bit_length() - 1)


def model_id(preset: str, model_paths: dict[str, str], cache_dir: Path) -> str:
    """What names the weights in frame metadata: stable across replicas (no local cache paths)."""
    if preset == sdxl.TINY and not model_paths.get(sdxl.TINY):
        return f"{sdxl.TINY}-v{sdxl.TINY_VERSION}"
    base, refiner = sdxl.resolve_paths(preset, model_paths, cache_dir)
    return f"{preset}:{base}|{refiner}"


class EngineCache:
    """Engines loaded once per process, by preset; the least recently used is dropped past ``capacity``."""

    def __init__(self, loader: Callable[[str], SDXLEngine], capacity: int = 2) -> None:
        self._loader = loader
        self._capacity = capacity
        self._engines: OrderedDict[str, SDXLEngine] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, preset: str) -> SDXLEngine:
        with self._lock:
            engine = self._engines.get(preset)
            if engine is not None:
                self._engines.move_to_end(preset)
                return engine
            while len(self._engines) >= self._capacity:
                _, old = self._engines.popitem(last=False)
                with old.lock:  # wait for its render to finish before letting it go
                    pass
                del old
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            started = time.monotonic()
            engine = self._loader(preset)
            self.loads += 1
            log.info("loaded preset %s in %.1f s", preset, time.monotonic() - started)
            self._engines[preset] = engine
            return engine

    def put(self, preset: str, engine: SDXLEngine) -> None:
        """Register an engine built elsewhere (the benchmark's random full-size model)."""
        with self._lock:
            self._engines[preset] = engine
            self._engines.move_to_end(preset)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._engines)


def load_engine(
    preset: str,
    *,
    model_paths: dict[str, str],
    cache_dir: Path,
    device: str = "auto",
    options: EngineOptions | None = None,
    compile_cache: CompileCache | None = None,
) -> SDXLEngine:
    pipes = sdxl.load_sdxl(preset, model_paths=model_paths, cache_dir=cache_dir, device=device)
    return SDXLEngine(
        pipes,
        model_id=model_id(preset, model_paths, cache_dir),
        options=options,
        compile_cache=compile_cache,
    )


COMPILE_CACHE_SERVICE = "keyframe-renderer"


def renderer_compile_cache(settings: RendererSettings, store, cache_dir: Path) -> CompileCache:
    """The renderer's compile cache: used whenever it compiles (settings.compile or a request's
    options.compile); off without a signing key."""
    return open_cache(
        settings.compile_cache, service=COMPILE_CACHE_SERVICE, models_cache_dir=cache_dir, store=store
    )
