"""Resumable training state: the two trained rows, their AdamW moments and the step.

The two trained rows are the whole optimizer state (they are the only trainable tensors; the rest of
the embedding tables never changes): a few KB instead of two 49408-row matrices. Stored as safetensors
(no pickle) with the step and a fingerprint of the training inputs in the metadata, so a checkpoint of a
different request is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .embedding import safetensors_metadata

FORMAT = "dreamframe-style-checkpoint/1"
ENCODERS = ("clip_l", "clip_g")


@dataclass
class TrainingState:
    step: int  # optimizer steps done
    rows: dict[str, torch.Tensor]  # "clip_l"/"clip_g" -> [dim]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    adam_step: float
    loss: float = float("nan")

    def to_bytes(self, fingerprint: str) -> bytes:
        from safetensors.torch import save

        tensors = {}
        for name in ENCODERS:
            tensors[f"{name}.row"] = self.rows[name].detach().float().cpu().contiguous()
            tensors[f"{name}.exp_avg"] = self.exp_avg[name].detach().float().cpu().contiguous()
            tensors[f"{name}.exp_avg_sq"] = self.exp_avg_sq[name].detach().float().cpu().contiguous()
        metadata = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "step": str(self.step),
            "adam_step": repr(float(self.adam_step)),
            "loss": repr(float(self.loss)),
        }
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, *, fingerprint: str) -> TrainingState | None:
        """The state, or None when the blob is not a checkpoint of this exact training request."""
        from safetensors.torch import load

        try:
            metadata = safetensors_metadata(data)
            if metadata.get("format") != FORMAT or metadata.get("fingerprint") != fingerprint:
                return None
            tensors = load(data)
            return cls(
                step=int(metadata["step"]),
                rows={n: tensors[f"{n}.row"] for n in ENCODERS},
                exp_avg={n: tensors[f"{n}.exp_avg"] for n in ENCODERS},
                exp_avg_sq={n: tensors[f"{n}.exp_avg_sq"] for n in ENCODERS},
                adam_step=float(metadata["adam_step"]),
                loss=float(metadata.get("loss", "nan")),
            )
        except Exception:  # noqa: BLE001
            return None  # unreadable or foreign: start over rather than fail
