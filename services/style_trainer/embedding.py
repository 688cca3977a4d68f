"""The learned style embedding: one row per SDXL text encoder, and the file formats it travels in.

- safetensors ``{"clip_l": [1, 768], "clip_g": [1, 1280]}`` (the token in the metadata): the layout
  diffusers' ``load_textual_inversion`` loads into each encoder (``text_encoder``/``tokenizer`` and
  ``text_encoder_2``/``tokenizer_2``).
- the reference's torch ``.pt`` dict ``{"emb": [768], "emb2": [1280]}`` (export and import).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from dreamframe.errors import InvalidArgument

FORMAT = "dreamframe-style-embedding/1"


@dataclass(frozen=True)
class StyleEmbedding:
    token: str
    clip_l: torch.Tensor  # [768] (text_encoder / CLIP-L)
    clip_g: torch.Tensor  # [1280] (text_encoder_2 / CLIP-bigG)

    def dims(self) -> tuple[int, int]:
        return int(self.clip_l.shape[0]), int(self.clip_g.shape[0])

    # --- safetensors (our output, diffusers-loadable) -----------------------------------------
    def to_safetensors(self) -> bytes:
        from safetensors.torch import save

        tensors = {
            "clip_l": self.clip_l.detach().float().cpu().reshape(1, -1).contiguous(),
            "clip_g": self.clip_g.detach().float().cpu().reshape(1, -1).contiguous(),
        }
        return save(tensors, metadata={"token": self.token, "format": FORMAT})

    @classmethod
    def from_safetensors(
        cls,
        data: bytes,
        *,
        token: str | None = None,
        dims: tuple[int, int] | None = None,
        field: str = "embedding",
    ) -> StyleEmbedding:
        from safetensors.torch import load

        try:
            tensors = load(data)
            metadata = safetensors_metadata(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad file
            raise InvalidArgument(f"not a safetensors file: {exc}", field=field) from exc
        name = token or metadata.get("token", "")
        if not name:
            raise InvalidArgument("no token given and none recorded in the file", field=f"{field}.token")
        return cls(
            name,
            _row(tensors, "clip_l", dims[0] if dims else None, field),
            _row(tensors, "clip_g", dims[1] if dims else None, field),
        )

    # --- the reference's .pt -------------------------------------------------------------------
    def to_reference_pt(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {"emb": self.clip_l.detach().float().cpu(), "emb2": self.clip_g.detach().float().cpu()}, buffer
        )
        return buffer.getvalue()

    @classmethod
    def from_reference_pt(
        cls,
        data: bytes,
        token: str,
        *,
        dims: tuple[int, int] | None = (768, 1280),
        field: str = "reference_embedding",
    ) -> StyleEmbedding:
        """Read ``{"emb": [768], "emb2": [1280]}`` (or the reference's list of such dicts, the last being
        the final one). Loaded with ``weights_only``: a .pt file cannot run code here."""
        try:
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise InvalidArgument(f"not a readable torch file: {exc}", field=field) from exc
        if isinstance(value, list) and value:
            value = value[-1]
        if not isinstance(value, dict):
            raise InvalidArgument('expected a dict {"emb": ..., "emb2": ...}', field=field)
        return cls(
            token,
            _row(value, "emb", dims[0] if dims else None, field),
            _row(value, "emb2", dims[1] if dims else None, field),
        )


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob: an 8-byte little-endian header length, then JSON."""
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def _row(tensors: dict, key: str, dim: int | None, field: str) -> torch.Tensor:
    """One embedding row as a float32 [dim] tensor; accepts [dim] or [1, dim]."""
    value = tensors.get(key)
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument("missing tensor", field=f"{field}.{key}")
    if value.ndim == 2 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 1 or (dim is not None and value.shape[0] != dim):
        want = f"[{dim}]" if dim is not None else "[dim]"
        raise InvalidArgument(f"has shape {list(value.shape)}, expected {want}", field=f"{field}.{key}")
    if not torch.isfinite(value.float()).all():
        raise InvalidArgument("contains NaN or inf", field=f"{field}.{key}")
    return value.float().clone()


def encoder_dims(pipe) -> tuple[int, int]:
    """(CLIP-L, CLIP-bigG) embedding widths of a pipeline (768, 1280 for SDXL)."""
    return (
        pipe.text_encoder.get_input_embeddings().weight.shape[1],
        pipe.text_encoder_2.get_input_embeddings().weight.shape[1],
    )


def single_token_ids(pipe, token: str) -> tuple[int, int] | None:
    """The token's id in both tokenizers when it is one token in each (a vocabulary word, or one
    already added), else None."""
    ids = []
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        encoded = tokenizer(token, add_special_tokens=False).input_ids
        if len(encoded) != 1:
            return None
        ids.append(encoded[0])
    return ids[0], ids[1]


def apply_embedding(pipe, embedding: StyleEmbedding) -> None:
    """Put the embedding into an SDXL pipeline's two text encoders, the way it was trained.

    When the token is already a single token in both tokenizers (the reference's case: the style keyword
    is a vocabulary word) its rows are overwritten in place, as the reference's ``set_XLembedding`` does —
    adding a *new* token instead would give it an id above ``<|endoftext|>``, which changes where SDXL's
    legacy CLIP config (eos_token_id=2, argmax pooling) takes the pooled embedding. Otherwise the token is
    added with diffusers' ``load_textual_inversion`` (new token, resized embeddings) in both encoders."""
    if encoder_dims(pipe) != embedding.dims():
        raise InvalidArgument(
            f"embedding widths {embedding.dims()} do not fit this model's text encoders {encoder_dims(pipe)}",
            field="embedding",
        )
    ids = single_token_ids(pipe, embedding.token)
    if ids is not None:
        with torch.no_grad():
            for encoder, token_id, row in (
                (pipe.text_encoder, ids[0], embedding.clip_l),
                (pipe.text_encoder_2, ids[1], embedding.clip_g),
            ):
                weight = encoder.get_input_embeddings().weight
                weight[token_id] = row.to(device=weight.device, dtype=weight.dtype)
        return
    for encoder, tokenizer, row in (
        (pipe.text_encoder, pipe.tokenizer, embedding.clip_l),
        (pipe.text_encoder_2, pipe.tokenizer_2, embedding.clip_g),
    ):
        pipe.load_textual_inversion(
            row.reshape(1, -1), token=embedding.token, text_encoder=encoder, tokenizer=tokenizer
        )
