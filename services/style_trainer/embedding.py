"""The learned style embedding: one row per SDXL text encoder, and the file formats it travels in.

- safetensors ``{"clip_l": [1, 768], "clip_g": [1, 1280]}`` (the token in the metadata): the layout
  diffusers' ``load_textual_inversion`` loads into each encoder (``text_encoder``/``tokenizer`` and
  ``text_encoder_2``/``tokenizer_2``).
- the reference's torch ``.pt`` dict ``{"emb": [768], "emb2": [1280]}`` (export and import).

``import_embedding`` takes an existing embedding in either format (the seed project's own ``.pt`` as it
is), checks it and returns it for storing as safetensors: ``dreamframe import-style`` and the coordinator's
style stage (StoryInput.style_embedding) both go through it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from dreamframe.errors import InvalidArgument
from dreamframe.limits import truncate

FORMAT = "dreamframe-style-embedding/1"
# An embedding file is two rows (the seed's final .pt: ~9 kB; its progression list of 11: ~60 kB).
MAX_EMBEDDING_BYTES = 4 * 1024 * 1024
MAX_TOKEN_CHARS = 64
# The text encoders' widths (CLIP-L, CLIP-bigG) of the presets known without loading a model: what an
# imported embedding must match to be rendered. tiny: dreamframe.models.sdxl.build_tiny_sdxl's configs.
PRESET_DIMS: dict[str, tuple[int, int]] = {"sdxl": (768, 1280), "sdxl-random": (768, 1280), "tiny": (32, 48)}


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
        require_token: bool = True,
    ) -> StyleEmbedding:
        """``require_token=False``: an imported file may leave the token to the job (the story's keyword)."""
        from safetensors.torch import load

        try:
            tensors = load(data)
            metadata = safetensors_metadata(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad file
            raise InvalidArgument(f"not a safetensors file: {exc}", field=field) from exc
        name = token or metadata.get("token", "")
        if not name and require_token:
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
            # weights_only refuses any global but tensors and plain containers: nothing in it was run.
            detail = truncate(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 160)
            raise InvalidArgument(f"not a readable torch file of tensors: {detail}", field=field) from exc
        # The seed saves the final {"emb", "emb2"} and, as "all<name>.pt", the progression list whose last
        # entry is the final one (DreamFrame-code StyleImmobilization/style_embedding.py, save_XLembedding).
        if isinstance(value, list) and value:
            value = value[-1]
        if not isinstance(value, dict):
            raise InvalidArgument('expected a dict {"emb": ..., "emb2": ...}', field=field)
        names = ("emb", "emb2")
        if "emb" not in value and "clip_l" in value:  # our own layout, saved with torch.save
            names = ("clip_l", "clip_g")
        elif len(value) == 1 and not set(value) & {"emb", "emb2", "clip_g"}:
            raise InvalidArgument(
                "holds one tensor ({token: tensor}, a single-encoder textual inversion); SDXL needs a row "
                'for each text encoder: {"emb": [768], "emb2": [1280]} or clip_l/clip_g',
                field=field,
            )
        return cls(
            token,
            _row(value, names[0], dims[0] if dims else None, field),
            _row(value, names[1], dims[1] if dims else None, field),
        )


def embedding_format(data: bytes) -> str:
    """``safetensors`` or ``torch`` (a .pt: zip archive or legacy pickle), from the first bytes alone."""
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON (starting "{").
    if len(data) >= 10 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8:
        return "safetensors"
    # torch.save: a zip archive (since torch 1.6), or the legacy format that starts with a pickle.
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        return "torch"
    return ""


def validate_token(token: str, field: str = "style_token") -> str:
    """One word, as the style keyword it usually is: it is put into every frame prompt."""
    if (
        not token
        or len(token) > MAX_TOKEN_CHARS
        or any(c.isspace() or not c.isprintable() or c in "{}" for c in token)
    ):
        raise InvalidArgument(
            f"must be one word of at most {MAX_TOKEN_CHARS} printable characters, without spaces or "
            f"braces, got {truncate(token, 40)!r}",
            field=field,
        )
    return token


def import_embedding(
    data: bytes,
    *,
    token: str = "",
    dims: tuple[int, int] | None = None,
    model: str = "the model",
    field: str = "style_embedding",
    token_field: str = "style_token",
) -> StyleEmbedding:
    """An existing embedding (our safetensors or the reference .pt), checked: both rows present, 1-D,
    finite floats, of ``dims`` when given (the text encoders of ``model``, the renderer's); ``token``
    (else the one the file records) checked as one word. The token may stay empty: the job then uses the
    story's keyword.

    The .pt is read with ``torch.load(weights_only=True)`` only: a pickle that names anything but tensors
    and plain containers is refused before any of it runs."""
    if len(data) > MAX_EMBEDDING_BYTES:
        raise InvalidArgument(
            f"has {len(data)} bytes; an embedding file has at most {MAX_EMBEDDING_BYTES}", field=field
        )
    kind = embedding_format(data)
    if kind == "safetensors":
        embedding = StyleEmbedding.from_safetensors(
            data, token=token or None, field=field, require_token=False
        )
    elif kind == "torch":
        embedding = StyleEmbedding.from_reference_pt(data, token, dims=None, field=field)
    else:
        raise InvalidArgument(
            "neither a safetensors file nor a torch .pt (expected {clip_l, clip_g} safetensors or the "
            'reference\'s {"emb", "emb2"} .pt)',
            field=field,
        )
    if dims is not None:
        check_dims(embedding, dims, model, field)
    if embedding.token:
        validate_token(embedding.token, field=token_field if token else f"{field}.token")
    return embedding


def check_dims(embedding: StyleEmbedding, dims: tuple[int, int], what: str, field: str) -> None:
    """The rows' widths against a model's text encoders (``what`` names the model in the message)."""
    if embedding.dims() != tuple(dims):
        raise InvalidArgument(
            f"has rows of {embedding.dims()[0]} and {embedding.dims()[1]} dimensions but {what}'s text "
            f"encoders need {dims[0]} and {dims[1]} (an embedding trained for another model?)",
            field=field,
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
    if not value.is_floating_point():
        raise InvalidArgument(f"must hold floating-point values, not {value.dtype}", field=f"{field}.{key}")
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
