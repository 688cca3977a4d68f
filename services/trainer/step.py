"""The math of one optimizer step, shared by the training loop and the throughput benchmark: forward
and backward over the step's micro-batches with the loss averaged over every answer token, and
gradient clipping by the global norm."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from . import modeling
from .data import Batch
from .distributed import DistContext, all_sum


def forward_backward(model, batches: list[Batch], ctx: DistContext, precision: modeling.Precision) -> dict:
    """Forward and backward over one optimizer step's micro-batches (gradients accumulate in the model).

    The loss is the mean over every answer token of the whole step (all micro-batches, all ranks), so
    batches of any padding and any answer length weigh by their tokens; FSDP averages gradients over
    ranks, hence the world-size factor. Returns the step's loss and token/sample counts (all ranks)."""
    label_tokens, tokens, samples, bad = all_sum(
        [
            sum(b.num_label_tokens for b in batches),
            sum(b.num_tokens for b in batches),
            sum(len(b.uids) for b in batches),
            sum(b.bad for b in batches),
        ],
        ctx,
    )
    n_items = max(int(label_tokens), 1)
    autocast = (
        torch.autocast(ctx.device.type, dtype=precision.compute_dtype)
        if precision.autocast
        else nullcontext()
    )
    loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for batch in batches:
        with autocast:
            out = model(**batch.model_inputs(ctx.device, precision.compute_dtype), num_items_in_batch=n_items)
        (out.loss * ctx.world_size).backward()
        loss_sum += out.loss.detach().float()
    (loss,) = all_sum([float(loss_sum)], ctx)
    return {
        "loss": loss,
        "tokens": int(tokens),
        "label_tokens": int(label_tokens),
        "samples": int(samples),
        "bad": int(bad),
    }


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip by global norm (over all ranks' shards); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
