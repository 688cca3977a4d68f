"""Textual inversion on both SDXL text encoders (the reference's style embedding, made fast).

One token row is learned in each encoder (CLIP-L 768, CLIP-bigG 1280): the style keyword itself when it
is a single token in both tokenizers (as the reference does), otherwise the keyword added as a new token
to both. Everything else is frozen; the gradient of every other row is zeroed and every other row is
restored after each optimizer step, so they stay bit-identical.

Where the time goes and what is done about it:
- the images are encoded by the VAE once, before the loop (mean and std of the latent distribution
  are cached; each pass draws a fresh latent sample and a random crop of it);
- the prompts (templates × variations) are tokenized once, onto the device;
- the time ids of every possible crop are tabled on the device;
- all randomness that feeds tensors is drawn on the device, so the loop never waits on the GPU
  (the loss is read one step late on GPUs for the same reason);
- the UNet runs under bf16 autocast on GPUs and only input gradients flow through it (its weights are
  frozen: the backward pass costs about one forward, not two).

The randomness of pass ``p`` is seeded from ``(seed, p)``, so a run resumed from a checkpoint at step k
draws exactly what the uninterrupted run drew after step k.
"""

from __future__ import annotations

import copy
import random
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreamframe.errors import FailedPrecondition, InvalidArgument
from dreamframe.models.sdxl import SDXLPipelines

from .checkpoint import ENCODERS, TrainingState
from .embedding import StyleEmbedding, single_token_ids
from .images import training_pixels
from .options import TrainOptions, learning_rate, resolve_resolution


@dataclass
class LatentImage:
    """One training image after the VAE: the latent distribution, scaled, plus its size facts."""

    mean: torch.Tensor  # [4, h, w] on the device, fp32
    std: torch.Tensor
    original_size: tuple[int, int]  # (height, width) of the image before resizing
    # time ids [n_top, n_left, 6] of every crop position: original size, crop top-left, target size
    time_ids: torch.Tensor


@dataclass(frozen=True)
class StepReport:
    step: int  # optimizer steps done (1-based after the step)
    total_steps: int
    loss: float
    lr: float
    passes_computed: int  # forward/backward passes computed by this run (not restored)
    elapsed: float  # seconds since training started in this run
    eta: float  # seconds left (estimate)


class TextualInversion:
    """Learns the style token on private copies of the text encoders and tokenizers: the shared,
    loaded-once pipeline is never modified (apart from freezing its UNet/VAE weights)."""

    def __init__(self, pipes: SDXLPipelines, keyword: str, options: TrainOptions) -> None:
        from diffusers import DDPMScheduler, StableDiffusionXLPipeline

        base = pipes.base
        self.options = options
        self.device = pipes.device
        self.resolution = resolve_resolution(options, pipes.resolution)
        # Autocast only casts fp32 weights: a UNet already in bf16 runs bf16 without it, and skipping its
        # per-op casts cut a pass from 211 to 183 ms on an H200 (these passes are launch-bound).
        self.autocast = (
            options.mixed_precision == "bf16"
            or (options.mixed_precision == "auto" and self.device.type == "cuda")
        ) and base.unet.dtype == torch.float32
        base.unet.requires_grad_(False)
        base.vae.requires_grad_(False)
        text_encoder = copy.deepcopy(base.text_encoder).requires_grad_(False)
        text_encoder_2 = copy.deepcopy(base.text_encoder_2).requires_grad_(False)
        # A pipeline over the copies: it renders with the embedding as trained ("in place").
        self.pipeline = StableDiffusionXLPipeline(
            vae=base.vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=copy.deepcopy(base.tokenizer),
            tokenizer_2=copy.deepcopy(base.tokenizer_2),
            unet=base.unet,
            scheduler=type(base.scheduler).from_config(base.scheduler.config),
            add_watermarker=False,
        )
        self.pipeline.set_progress_bar_config(disable=True)
        prediction_type = base.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise FailedPrecondition(
                f"unsupported prediction type {prediction_type!r}", field="options.preset"
            )
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=options.num_train_timesteps,
            beta_start=options.beta_start,
            beta_end=options.beta_end,
            beta_schedule=options.beta_schedule,
            clip_sample=False,
            prediction_type=prediction_type,
        )
        self.encoders = (text_encoder, text_encoder_2)
        self.token, self.token_ids, self.added = self._placeholder(keyword)
        self.weights = []
        init = torch.Generator().manual_seed(
            int(np.random.SeedSequence([options.seed, 1]).generate_state(1)[0])
        )
        for encoder, token_id in zip(self.encoders, self.token_ids, strict=True):
            embedding = encoder.get_input_embeddings()
            if embedding.weight.dtype != torch.float32:
                # fp32 master rows (in bf16, steps of ~1e-4 on values of ~1e-2 round away); lookups
                # are cast to the encoder's dtype, so it computes exactly as it will at inference.
                embedding.register_forward_hook(_cast_output(embedding.weight.dtype))
                embedding.to(torch.float32)
            weight = embedding.weight
            with torch.no_grad():
                row = torch.randn(weight.shape[1], generator=init) * options.init_scale
                weight[token_id] = row.to(device=weight.device, dtype=weight.dtype)
            weight.requires_grad_(True)
            self.weights.append(weight)
        # Every row but the token's, as it was, and the mask that selects them.
        self.originals = [w.detach().clone() for w in self.weights]
        self.keep_masks = [
            (torch.arange(w.shape[0], device=w.device) != token_id)[:, None]
            for w, token_id in zip(self.weights, self.token_ids, strict=True)
        ]
        self.optimizer = torch.optim.AdamW(
            self.weights,
            lr=options.lr_stages[0][1],
            betas=options.adam_betas,
            eps=options.adam_eps,
            weight_decay=options.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.step = 0
        self.prompts = [
            template.format(f"{self.token} {variation}".strip())
            for template in options.templates
            for variation in (options.variations or ("",))
        ]
        self.prompt_ids = [
            self._tokenize(tokenizer) for tokenizer in (self.pipeline.tokenizer, self.pipeline.tokenizer_2)
        ]
        self.latents: list[LatentImage] = []
        self.unet = base.unet
        self._compiled_unet = None
        self._generator = torch.Generator(device=self.device)
        self.last_loss = float("nan")

    # --- setup ---------------------------------------------------------------------------------
    def _placeholder(self, keyword: str) -> tuple[str, tuple[int, int], bool]:
        keyword = keyword.strip()
        if not keyword:
            raise InvalidArgument("must not be empty", field="style_keyword")
        ids = single_token_ids(self.pipeline, keyword)
        if ids is not None:
            return keyword, ids, False
        for tokenizer, encoder in zip(
            (self.pipeline.tokenizer, self.pipeline.tokenizer_2), self.encoders, strict=True
        ):
            tokenizer.add_tokens(keyword)
            if len(tokenizer) > encoder.get_input_embeddings().weight.shape[0]:
                encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids = single_token_ids(self.pipeline, keyword)
        if ids is None:
            raise FailedPrecondition(f"cannot make {keyword!r} a single token", field="style_keyword")
        return keyword, ids, True

    def _tokenize(self, tokenizer) -> torch.Tensor:
        ids = tokenizer(
            self.prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)

    def encode_images(self, images: Sequence[Image.Image]) -> None:
        """VAE-encode every image (and its mirror image) once; the loop only samples and crops."""
        vae = self.pipeline.vae
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        items = [
            (image, mirrored)
            for image in images
            for mirrored in ((False, True) if self.options.mirror else (False,))
        ]
        crop = self.resolution // self.pipeline.vae_scale_factor
        self.latents = []
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        if upcast:
            vae.to(torch.float32)  # fp16 overflows in the SDXL VAE; bf16 does not
        try:
            # One at a time: sizes may differ, and this runs once per training, not per step.
            for image, mirrored in items:
                pixels = training_pixels(image, self.resolution, mirror=mirrored)
                with torch.no_grad():
                    dist = vae.encode(pixels[None].to(self.device, vae.dtype)).latent_dist
                mean = ((dist.mean[0].float() - shift) * scale).contiguous()
                std = (dist.std[0].float() * scale).contiguous()
                self.latents.append(
                    LatentImage(
                        mean, std, (image.height, image.width), self._time_id_table(image, mean, crop)
                    )
                )
        finally:
            if upcast:
                vae.to(torch.float16)

    def _time_id_table(self, image: Image.Image, mean: torch.Tensor, crop: int) -> torch.Tensor:
        factor = self.pipeline.vae_scale_factor
        h, w = mean.shape[1:]
        table = torch.tensor(
            [
                [
                    [image.height, image.width, top * factor, left * factor, self.resolution, self.resolution]
                    for left in range(w - crop + 1)
                ]
                for top in range(h - crop + 1)
            ],
            dtype=torch.float32,
        )
        return table.to(self.device)

    def load_state(self, state: TrainingState) -> None:
        """Continue from a checkpoint: rows, AdamW moments (zero outside the rows) and step."""
        full = self.optimizer.state_dict()
        full["state"] = {}
        with torch.no_grad():
            for index, (name, weight, token_id) in enumerate(
                zip(ENCODERS, self.weights, self.token_ids, strict=True)
            ):
                weight[token_id] = state.rows[name].to(weight.device, weight.dtype)
                exp_avg = torch.zeros_like(weight)
                exp_avg_sq = torch.zeros_like(weight)
                exp_avg[token_id] = state.exp_avg[name].to(weight.device, weight.dtype)
                exp_avg_sq[token_id] = state.exp_avg_sq[name].to(weight.device, weight.dtype)
                full["state"][index] = {
                    "step": torch.tensor(state.adam_step, dtype=torch.float32),
                    "exp_avg": exp_avg,
                    "exp_avg_sq": exp_avg_sq,
                }
        self.optimizer.load_state_dict(full)
        self.step = state.step

    def state(self, loss: float = float("nan")) -> TrainingState:
        rows, exp_avg, exp_avg_sq, adam_step = {}, {}, {}, 0.0
        for name, weight, token_id in zip(ENCODERS, self.weights, self.token_ids, strict=True):
            rows[name] = weight.detach()[token_id].float().cpu()
            moments = self.optimizer.state.get(weight, {})
            zero = torch.zeros(weight.shape[1])
            exp_avg[name] = moments["exp_avg"][token_id].float().cpu() if moments else zero
            exp_avg_sq[name] = moments["exp_avg_sq"][token_id].float().cpu() if moments else zero
            adam_step = float(moments["step"]) if moments else 0.0
        return TrainingState(self.step, rows, exp_avg, exp_avg_sq, adam_step, loss)

    def embedding(self) -> StyleEmbedding:
        rows = [
            w.detach()[i].float().cpu().clone() for w, i in zip(self.weights, self.token_ids, strict=True)
        ]
        return StyleEmbedding(self.token, rows[0], rows[1])

    # --- the loop ------------------------------------------------------------------------------
    def _seeds(self, pass_index: int) -> tuple[int, int]:
        state = np.random.SeedSequence([self.options.seed, 2, pass_index]).generate_state(2)
        return int(state[0]), int(state[1])

    def _batch(self, pass_index: int):
        """Latents, noise, timesteps, prompt ids and time ids for one pass, drawn from its own seeds."""
        cpu_seed, device_seed = self._seeds(pass_index)
        choose = random.Random(cpu_seed)
        generator = self._generator.manual_seed(device_seed)
        crop = self.resolution // self.pipeline.vae_scale_factor
        latents, time_ids, prompts = [], [], []
        for _ in range(self.options.batch_size):
            item = self.latents[choose.randrange(len(self.latents))]
            n_top, n_left = item.time_ids.shape[:2]
            top, left = choose.randrange(n_top), choose.randrange(n_left)
            mean = item.mean[:, top : top + crop, left : left + crop]
            std = item.std[:, top : top + crop, left : left + crop]
            eps = torch.randn(mean.shape, generator=generator, device=self.device)
            latents.append(mean + std * eps)
            time_ids.append(item.time_ids[top, left])
            prompts.append(choose.randrange(len(self.prompts)))
        latents = torch.stack(latents)
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        timesteps = torch.randint(
            0, self.options.num_train_timesteps, (latents.shape[0],), generator=generator, device=self.device
        )
        ids = [torch.stack([table[p] for p in prompts]) for table in self.prompt_ids]
        return latents, noise, timesteps, ids, torch.stack(time_ids)

    def _loss(self, *pass_indices: int) -> torch.Tensor:
        """Mean loss over the samples of the given passes (one forward for all of them)."""
        parts = [self._batch(p) for p in pass_indices]
        latents, noise, timesteps, time_ids = (torch.cat([part[i] for part in parts]) for i in (0, 1, 2, 4))
        ids_1, ids_2 = (torch.cat([part[3][k] for part in parts]) for k in (0, 1))
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        unet = self._compiled_unet if self._compiled_unet is not None else self.unet
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            prompt_embeds, pooled = self.encode_prompts(ids_1, ids_2)
            dtype = self.unet.dtype
            pred = unet(
                noisy.to(dtype),
                timesteps,
                encoder_hidden_states=prompt_embeds.to(dtype),
                added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids},
            ).sample
        return F.mse_loss(pred.float(), target.float())

    def encode_prompts(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's ``encode_prompt`` on token ids, keeping the graph: the penultimate hidden states of both
        encoders side by side, and the second encoder's pooled (projected) output."""
        out_1 = self.encoders[0](ids_1, output_hidden_states=True)
        out_2 = self.encoders[1](ids_2, output_hidden_states=True)
        return torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), out_2.text_embeds

    def evaluate_loss(self, *, samples: int = 8, seed_offset: int = 1_000_000) -> float:
        """Mean loss on fixed draws (same timesteps, noise, crops and prompts every call): a
        noise-free measure of how well the current embedding fits the images."""
        with torch.no_grad():
            losses = [self._loss(seed_offset + i) for i in range(samples)]
        return float(torch.stack(losses).mean())

    def _optimizer_step(self, step: int) -> float:
        lr = learning_rate(step, self.options.max_train_steps, self.options.lr_stages)
        for weight, keep in zip(self.weights, self.keep_masks, strict=True):
            weight.grad.masked_fill_(keep, 0.0)  # only the token's row learns
            # Per encoder, as the reference clips each text encoder separately.
            torch.nn.utils.clip_grad_norm_([weight], self.options.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for weight, original, keep in zip(self.weights, self.originals, self.keep_masks, strict=True):
                weight.copy_(torch.where(keep, original, weight))
        return lr

    def train(self, *, should_stop: Callable[[], bool] | None = None) -> Iterator[StepReport]:
        """Run the remaining optimizer steps, yielding a report after each. Stops early (between
        steps) when ``should_stop()`` turns true; the caller checkpoints what it has."""
        if not self.latents:
            raise InvalidArgument("no training images", field="style_images")
        options = self.options
        accumulation = options.gradient_accumulation_steps
        total = options.max_train_steps
        if options.compile and self._compiled_unet is None:
            self._compiled_unet = compiled(self.unet, options.compile_mode)
        lag = 1 if self.device.type == "cuda" else 0  # read losses a step late: no GPU stall
        batched = options.batch_accumulation
        if batched is None:
            batched = self.device.type == "cuda"
        pending: list[tuple[int, torch.Tensor, float]] = []
        started = time.perf_counter()
        first_step = self.step
        passes = 0

        def report(keep: int) -> Iterator[StepReport]:
            while len(pending) > keep:
                step, value, lr = pending.pop(0)
                elapsed = time.perf_counter() - started
                per_step = elapsed / max(self.step - first_step, 1)
                self.last_loss = float(value)
                yield StepReport(
                    step, total, self.last_loss, lr, passes, elapsed, per_step * (total - self.step)
                )

        if options.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        try:
            while self.step < total:
                indices = [self.step * accumulation + micro for micro in range(accumulation)]
                if batched:
                    loss = self._loss(*indices)
                    loss.backward()
                    step_loss = loss.detach()
                else:
                    step_loss = torch.zeros((), device=self.device)
                    for index in indices:
                        loss = self._loss(index)
                        (loss / accumulation).backward()
                        step_loss += loss.detach() / accumulation
                passes += accumulation
                lr = self._optimizer_step(self.step)
                self.step += 1
                pending.append((self.step, step_loss, lr))
                yield from report(lag)
                if should_stop is not None and should_stop():
                    break
            yield from report(0)
        finally:
            if options.gradient_checkpointing:
                self.unet.disable_gradient_checkpointing()


# One compiled UNet per (model, mode) for the whole process: every request reuses it instead of paying
# the compile again.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    per_mode = _COMPILED.setdefault(module, {})
    if mode not in per_mode:
        per_mode[mode] = torch.compile(module, mode=mode)
    return per_mode[mode]


def _cast_output(dtype: torch.dtype):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)

    return hook
