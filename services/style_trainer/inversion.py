"""Textual inversion on both SDXL text encoders (the reference's style embedding, made fast).

One token row is learned in each encoder (CLIP-L 768, CLIP-bigG 1280): the style keyword itself when it
is a single token in both tokenizers (as the reference does), otherwise the keyword added as a new token
to both. The two rows are the only trainable tensors: the encoders' lookups put them in at the token's
positions, and every other weight (the rest of both embedding tables included) is the loaded model's,
untouched. That is exactly the reference's update (its gradient masking, per-encoder clipping, AdamW and
row restoring act on the token's row alone) without gradients, optimizer state or restores over two
49408-row tables.

Where the time goes and what is done about it:
- the images are encoded by the VAE once, before the loop (mean and std of the latent distribution
  are cached; each pass draws a fresh latent sample and a random crop of it);
- the prompts (templates × variations) are tokenized once, onto the device;
- the time ids of every possible crop are tabled on the device;
- all randomness that feeds tensors is drawn on the device, so the loop never waits on the GPU;
  losses are read to the host in bunches (``loss_read_every``), one step late;
- the UNet runs in its own bf16 and only input gradients flow through it (its weights are frozen: the
  backward pass costs about one forward, not two); the text encoders likewise;
- with ``compile`` the UNet and both text encoders are compiled once per process (CUDA graphs with
  "reduce-overhead"), the per-request state (rows, token ids) living in the same tensors every time.

The randomness of pass ``p`` is seeded from ``(seed, p)``, so a run resumed from a checkpoint at step k
draws exactly what the uninterrupted run drew after step k.
"""

from __future__ import annotations

import copy
import random
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreamframe.errors import FailedPrecondition, InvalidArgument
from dreamframe.models.attention import sdpa_context
from dreamframe.models.sdxl import SDXLPipelines
from dreamframe.progress import ProgressClock

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


class TokenEmbedding(torch.nn.Module):
    """A text encoder's token lookup with one trainable fp32 row put in wherever ``token_id`` occurs.

    The table is the loaded model's (shared, frozen); ids past its end (a token added to the tokenizer)
    look up its last row and are then replaced. The row is fp32 (in bf16, steps of ~1e-4 on values of
    ~1e-2 round away) and cast to the table's dtype after the lookup, as the encoder computes at
    inference with the row in its table."""

    def __init__(self, table: torch.nn.Embedding) -> None:
        super().__init__()
        self.table = table
        weight = table.weight
        self.row = torch.nn.Parameter(torch.zeros(weight.shape[1], device=weight.device, dtype=torch.float32))
        self.register_buffer("token_id", torch.tensor(-1, device=weight.device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.table.weight
        looked_up = F.embedding(ids.clamp(max=weight.shape[0] - 1), weight)
        mixed = torch.where((ids == self.token_id)[..., None], self.row, looked_up.float())
        return mixed.to(weight.dtype)


class PromptEncoder(torch.nn.Module):
    """SDXL's ``encode_prompt`` on token ids, differentiable in the two token rows: the penultimate
    hidden states of both encoders side by side, and the second encoder's pooled (projected) output.

    Built once per loaded model (``prompt_encoder_for``) over structural copies of its text encoders that
    share every weight with them, so it is compiled once per process; each training binds its own rows
    and token ids into the same tensors (``TextualInversion._bind``)."""

    def __init__(self, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = _sharing_copy(text_encoder)
        self.text_encoder_2 = _sharing_copy(text_encoder_2)
        self.requires_grad_(False)
        self.lookups = []
        for encoder in (self.text_encoder, self.text_encoder_2):
            lookup = TokenEmbedding(encoder.get_input_embeddings())
            encoder.set_input_embeddings(lookup)
            if encoder.get_input_embeddings() is not lookup:
                raise FailedPrecondition("cannot replace the text encoder's token lookup", field="preset")
            lookup.row.requires_grad_(True)
            self.lookups.append(lookup)
        self.owner: weakref.ref | None = None  # the training whose rows are in
        self.source_2 = weakref.ref(text_encoder_2)

    @property
    def rows(self) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        return self.lookups[0].row, self.lookups[1].row

    def forward(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_1 = self.text_encoder(ids_1, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        return torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), out_2.text_embeds


def _sharing_copy(module: torch.nn.Module, *, except_: Sequence[torch.Tensor] = ()) -> torch.nn.Module:
    """A copy of the module's structure and config that shares its parameters and buffers (but the
    tensors in ``except_``, which are copied)."""
    own = {id(t) for t in except_}
    memo = {id(t): t for t in (*module.parameters(), *module.buffers()) if id(t) not in own}
    return copy.deepcopy(module, memo)


# One prompt encoder per loaded text encoder (the value holds no reference to its key: it only shares
# the key's tensors, so the entry goes with the model).
_PROMPT_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prompt_encoder_for(base) -> PromptEncoder:
    """The prompt encoder over a pipeline's two text encoders (made on first use)."""
    encoder = _PROMPT_ENCODERS.get(base.text_encoder)
    if encoder is None or encoder.source_2() is not base.text_encoder_2:
        encoder = _PROMPT_ENCODERS[base.text_encoder] = PromptEncoder(base.text_encoder, base.text_encoder_2)
    return encoder


class PhaseTimer:
    """GPU time between marks (CUDA events, no host syncs), summed per phase: the interval that ends at
    a mark is the mark's phase."""

    def __init__(self) -> None:
        self.events: list[tuple[str, torch.cuda.Event]] = []

    def mark(self, phase: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append((phase, event))

    def seconds(self) -> dict[str, float]:
        torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for (_, start), (phase, end) in zip(self.events, self.events[1:], strict=False):
            totals[phase] = totals.get(phase, 0.0) + start.elapsed_time(end) / 1e3
        return totals


class TextualInversion:
    """Learns the style token. The loaded pipeline is never modified, apart from freezing the weights of
    its UNet, VAE and text encoders and (``channels_last``) the UNet's memory format."""

    def __init__(self, pipes: SDXLPipelines, keyword: str, options: TrainOptions) -> None:
        from diffusers import DDPMScheduler

        base = pipes.base
        self.base = base
        self.options = options
        self.device = pipes.device
        self.resolution = resolve_resolution(options, pipes.resolution)
        self.vae_scale_factor = base.vae_scale_factor
        # Autocast only casts fp32 weights: a UNet already in bf16 runs bf16 without it, and skipping its
        # per-op casts cut a pass from 211 to 183 ms on an H200 (these passes are launch-bound).
        self.autocast = (
            options.mixed_precision == "bf16"
            or (options.mixed_precision == "auto" and self.device.type == "cuda")
        ) and base.unet.dtype == torch.float32
        for module in (base.unet, base.vae, base.text_encoder, base.text_encoder_2):
            module.requires_grad_(False)
        self.tokenizers = types.SimpleNamespace(
            tokenizer=copy.deepcopy(base.tokenizer), tokenizer_2=copy.deepcopy(base.tokenizer_2)
        )
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
        self.token, self.token_ids, self.added = self._placeholder(keyword)
        self.prompt_encoder = prompt_encoder_for(base)
        init = torch.Generator().manual_seed(
            int(np.random.SeedSequence([options.seed, 1]).generate_state(1)[0])
        )
        # This training's rows while another one holds the prompt encoder (see _bind).
        self._parked: list[torch.Tensor] | None = [
            (torch.randn(row.shape[0], generator=init) * options.init_scale).to(row.device)
            for row in self.prompt_encoder.rows
        ]
        self._bind()
        self.optimizer = torch.optim.AdamW(
            self.prompt_encoder.rows,
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
            self._tokenize(tokenizer)
            for tokenizer in (self.tokenizers.tokenizer, self.tokenizers.tokenizer_2)
        ]
        self.latents: list[LatentImage] = []
        self.unet = base.unet
        self._compiled_unet = None
        self._compiled_prompts = None
        self._cache_session = None
        self._pipeline = None
        self._generator = torch.Generator(device=self.device)
        self.last_loss = float("nan")
        # Set to a PhaseTimer to time the phases of every step on the GPU (benchmarks).
        self.timer: PhaseTimer | None = None

    # --- setup ---------------------------------------------------------------------------------
    def _placeholder(self, keyword: str) -> tuple[str, tuple[int, int], bool]:
        keyword = keyword.strip()
        if not keyword:
            raise InvalidArgument("must not be empty", field="style_keyword")
        ids = single_token_ids(self.tokenizers, keyword)
        if ids is not None:
            return keyword, ids, False
        for tokenizer in (self.tokenizers.tokenizer, self.tokenizers.tokenizer_2):
            tokenizer.add_tokens(keyword)
        ids = single_token_ids(self.tokenizers, keyword)
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

    def _bind(self) -> None:
        """Put this training's rows and token ids into the shared prompt encoder (parking the rows of
        the training that held it), so its compiled graphs see them."""
        encoder = self.prompt_encoder
        holder = encoder.owner() if encoder.owner is not None else None
        if holder is self:
            return
        if holder is not None:
            holder._parked = [row.detach().clone() for row in encoder.rows]
        with torch.no_grad():
            for lookup, row, token_id in zip(encoder.lookups, self._parked, self.token_ids, strict=True):
                lookup.row.copy_(row)
                lookup.row.grad = None
                lookup.token_id.fill_(token_id)
        encoder.owner = weakref.ref(self)
        self._parked = None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the current token rows (fp32, [768] and [1280] for SDXL)."""
        rows = self._parked if self._parked is not None else self.prompt_encoder.rows
        return rows[0].detach().clone(), rows[1].detach().clone()

    @property
    def pipeline(self):
        """An SDXL pipeline with the embedding as trained so far in its text encoders (their tables are
        copies; every other weight is the loaded model's): renders what the saved embedding renders."""
        from diffusers import StableDiffusionXLPipeline

        base = self.base
        if self._pipeline is None:
            encoders = []
            for encoder, tokenizer in (
                (base.text_encoder, self.tokenizers.tokenizer),
                (base.text_encoder_2, self.tokenizers.tokenizer_2),
            ):
                own = _sharing_copy(encoder, except_=[encoder.get_input_embeddings().weight])
                if len(tokenizer) > own.get_input_embeddings().weight.shape[0]:
                    own.resize_token_embeddings(len(tokenizer), mean_resizing=False)
                encoders.append(own.requires_grad_(False))
            self._pipeline = StableDiffusionXLPipeline(
                vae=base.vae,
                text_encoder=encoders[0],
                text_encoder_2=encoders[1],
                tokenizer=self.tokenizers.tokenizer,
                tokenizer_2=self.tokenizers.tokenizer_2,
                unet=base.unet,
                scheduler=type(base.scheduler).from_config(base.scheduler.config),
                add_watermarker=False,
            )
            self._pipeline.set_progress_bar_config(disable=True)
        with torch.no_grad():
            for encoder, token_id, row in zip(
                (self._pipeline.text_encoder, self._pipeline.text_encoder_2),
                self.token_ids,
                self.rows(),
                strict=True,
            ):
                weight = encoder.get_input_embeddings().weight
                weight[token_id] = row.to(weight.dtype)
        return self._pipeline

    def encode_images(self, images: Sequence[Image.Image]) -> None:
        """VAE-encode every image (and its mirror image) once; the loop only samples and crops."""
        vae = self.base.vae
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        items = [
            (image, mirrored)
            for image in images
            for mirrored in ((False, True) if self.options.mirror else (False,))
        ]
        crop = self.resolution // self.vae_scale_factor
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
        factor = self.vae_scale_factor
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
        """Continue from a checkpoint: rows, AdamW moments and step."""
        self._bind()
        full = self.optimizer.state_dict()
        full["state"] = {}
        with torch.no_grad():
            for index, (name, row) in enumerate(zip(ENCODERS, self.prompt_encoder.rows, strict=True)):
                row.copy_(state.rows[name].to(row.device, row.dtype))
                full["state"][index] = {
                    "step": torch.tensor(state.adam_step, dtype=torch.float32),
                    "exp_avg": state.exp_avg[name].to(row.device, row.dtype).clone(),
                    "exp_avg_sq": state.exp_avg_sq[name].to(row.device, row.dtype).clone(),
                }
        self.optimizer.load_state_dict(full)
        self.step = state.step

    def state(self, loss: float = float("nan")) -> TrainingState:
        self._bind()
        rows, exp_avg, exp_avg_sq, adam_step = {}, {}, {}, 0.0
        for name, row in zip(ENCODERS, self.prompt_encoder.rows, strict=True):
            # Copies (on a CPU, .cpu() would alias the live tensors).
            rows[name] = row.detach().float().cpu().clone()
            moments = self.optimizer.state.get(row, {})
            zero = torch.zeros(row.shape[0])
            exp_avg[name] = moments["exp_avg"].float().cpu().clone() if moments else zero
            exp_avg_sq[name] = moments["exp_avg_sq"].float().cpu().clone() if moments else zero
            adam_step = float(moments["step"]) if moments else 0.0
        return TrainingState(self.step, rows, exp_avg, exp_avg_sq, adam_step, loss)

    def embedding(self) -> StyleEmbedding:
        rows = [row.cpu() for row in self.rows()]
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
        crop = self.resolution // self.vae_scale_factor
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

    def _mark(self, phase: str) -> None:
        if self.timer is not None:
            self.timer.mark(phase)

    def _loss(self, *pass_indices: int, compiled: bool = True) -> torch.Tensor:
        """Mean loss over the samples of the given passes (one forward for all of them); ``compiled``:
        through the compiled modules where training compiled them."""
        self._bind()
        parts = [self._batch(p) for p in pass_indices]
        latents, noise, timesteps, time_ids = (torch.cat([part[i] for part in parts]) for i in (0, 1, 2, 4))
        ids_1, ids_2 = (torch.cat([part[3][k] for part in parts]) for k in (0, 1))
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        encode, unet = self.prompt_encoder, self.unet
        if compiled and self._compiled_prompts is not None:
            encode = self._compiled_prompts
        if compiled and self._compiled_unet is not None:
            unet = self._compiled_unet
        self._mark("batch")
        with self._attention(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            prompt_embeds, pooled = encode(ids_1, ids_2)
            self._mark("text_forward")
            if self.timer is not None and prompt_embeds.requires_grad:
                prompt_embeds.register_hook(lambda grad: self._mark("unet_backward"))
            dtype = self.unet.dtype
            pred = unet(
                noisy.to(dtype),
                timesteps,
                encoder_hidden_states=prompt_embeds.to(dtype),
                added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids},
            ).sample
        loss = F.mse_loss(pred.float(), target.float())
        self._mark("unet_forward")
        return loss

    def _attention(self):
        # The preferred kernel first, the others behind it: CLIP's masked attention has no cuDNN kernel.
        return sdpa_context(self.options.attention_backend)

    def encode_prompts(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's ``encode_prompt`` on token ids with this training's rows, keeping the graph."""
        self._bind()
        return self.prompt_encoder(ids_1, ids_2)

    def evaluate_loss(self, *, samples: int = 8, seed_offset: int = 1_000_000) -> float:
        """Mean loss on fixed draws (same timesteps, noise, crops and prompts every call): a
        noise-free measure of how well the current embedding fits the images."""
        with torch.no_grad():
            losses = [self._loss(seed_offset + i, compiled=False) for i in range(samples)]
        return float(torch.stack(losses).mean())

    def _optimizer_step(self, step: int) -> float:
        lr = learning_rate(step, self.options.max_train_steps, self.options.lr_stages)
        for row in self.prompt_encoder.rows:
            # Per encoder, as the reference clips each text encoder separately (the gradient it clips is
            # zero outside the token's row).
            torch.nn.utils.clip_grad_norm_([row], self.options.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _prepare(self) -> None:
        """The speed options: the UNet's memory format, and the compiled modules (cached per process)."""
        options = self.options
        on_gpu = self.device.type == "cuda"
        channels_last = on_gpu if options.channels_last is None else options.channels_last
        layout = torch.channels_last if channels_last else torch.contiguous_format
        if any(p.dim() == 4 and not p.is_contiguous(memory_format=layout) for p in self.unet.parameters()):
            self.unet.to(memory_format=layout)
        text = options.compile if options.compile_text_encoders is None else options.compile_text_encoders
        fresh = (options.compile and not is_compiled(self.unet, options.compile_mode)) or (
            text and not is_compiled(self.prompt_encoder, options.compile_mode)
        )
        if fresh:
            # First compile of these modules in this process: load what another process compiled.
            self._cache_session = self._compile_cache_session(text, channels_last)
        self._compiled_unet = compiled(self.unet, options.compile_mode) if options.compile else None
        self._compiled_prompts = compiled(self.prompt_encoder, options.compile_mode) if text else None

    def _compile_cache_session(self, text: bool, channels_last: bool):
        """The compile-cache lookup for this model, options and shapes (None when the cache is off)."""
        from dreamframe.models.compile_cache import config_hash

        cache = style_compile_cache()
        if not cache.enabled:
            return None
        options = self.options
        base = self.base
        model = {
            "configs": config_hash(
                base.unet.config, base.text_encoder.config.to_dict(), base.text_encoder_2.config.to_dict()
            ),
            "dtype": str(base.unet.dtype),
        }
        compile_options = {
            "compile_mode": options.compile_mode,
            "unet": options.compile,
            "text_encoders": text,
            "autocast": self.autocast,
            "channels_last": channels_last,
            "batched": options.batch_accumulation,
            "gradient_checkpointing": options.gradient_checkpointing,
            "attention_backend": options.attention_backend,
        }
        workload = {
            "resolution": self.resolution,
            "accumulation": options.gradient_accumulation_steps,
            "batch_size": options.batch_size,
            "tokens": [int(ids.shape[-1]) for ids in self.prompt_ids],
        }
        return cache.session(
            cache.key(model=model, options=compile_options, workload=workload, device=self.device)
        )

    def _finish_compile_cache(self) -> None:
        """After the first compiled step (forward, backward and optimizer): save what compiled, if new."""
        session = self._cache_session
        if session is not None and not session.finished:
            session.finish()

    def train(self, *, should_stop: Callable[[], bool] | None = None) -> Iterator[StepReport]:
        """Run the remaining optimizer steps, yielding a report for each (in bunches of
        ``loss_read_every``). Stops early (between steps) when ``should_stop()`` turns true; the caller
        checkpoints what it has."""
        if not self.latents:
            raise InvalidArgument("no training images", field="style_images")
        options = self.options
        accumulation = options.gradient_accumulation_steps
        total = options.max_train_steps
        on_gpu = self.device.type == "cuda"
        self._prepare()
        self._bind()
        lag = 1 if on_gpu else 0  # read losses a step late: no GPU stall
        read_every = options.loss_read_every or (10 if on_gpu else 1)
        every = options.checkpoint_every
        graphs = (
            on_gpu
            and "reduce-overhead" in options.compile_mode
            and (self._compiled_unet is not None or self._compiled_prompts is not None)
        )
        batched = options.batch_accumulation
        if batched is None:
            batched = on_gpu
        pending: list[tuple[int, torch.Tensor, float]] = []
        clock = ProgressClock(total, "steps")
        clock.skip(self.step)  # steps restored from a checkpoint set no pace
        passes = 0

        def report(keep: int) -> Iterator[StepReport]:
            if len(pending) <= keep:
                return
            ready = pending[: len(pending) - keep]
            del pending[: len(pending) - keep]
            values = torch.stack([value for _, value, _ in ready]).tolist()  # one host sync for all
            clock.reach(self.step)
            for (step, _, lr), value in zip(ready, values, strict=True):
                self.last_loss = value
                yield StepReport(step, total, value, lr, passes, clock.elapsed, clock.eta)

        if options.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        try:
            while self.step < total:
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are done
                self._mark("between_steps")
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
                self._mark("text_backward")
                passes += accumulation
                lr = self._optimizer_step(self.step)
                self._mark("optimizer")
                self._finish_compile_cache()
                self.step += 1
                pending.append((self.step, step_loss, lr))
                if len(pending) >= lag + read_every or (every and self.step % every == 0):
                    yield from report(lag)
                if should_stop is not None and should_stop():
                    break
            yield from report(0)
        finally:
            if options.gradient_checkpointing:
                self.unet.disable_gradient_checkpointing()


# One compiled module per (module, mode) for the whole process: every request reuses it instead of paying
# the compile again.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    per_mode = _COMPILED.setdefault(module, {})
    if mode not in per_mode:
        per_mode[mode] = _compile(module, mode)
    return per_mode[mode]


def is_compiled(module: torch.nn.Module, mode: str) -> bool:
    return mode in _COMPILED.get(module, {})


COMPILE_CACHE_SERVICE = "style-trainer"
_compile_cache = None


def use_compile_cache(cache) -> None:
    """Set the process's compile cache (the service at start-up, tests); None: open it from settings."""
    global _compile_cache
    _compile_cache = cache


def style_compile_cache():
    """The style trainer's compile cache (dreamframe.models.compile_cache): the one set with
    ``use_compile_cache``, else opened once from the process's settings (style.compile_cache,
    models.cache_dir, storage)."""
    global _compile_cache
    if _compile_cache is None:
        from dreamframe.models.compile_cache import open_service_cache

        _compile_cache = open_service_cache("style", COMPILE_CACHE_SERVICE)
    return _compile_cache


def _compile(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    return torch.compile(module, mode=mode)
