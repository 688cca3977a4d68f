"""The style embedding: one learned row per SDXL text encoder, bound to a token.

File format (style-trainer's output): safetensors ``{"clip_l": [1, 768], "clip_g": [1, 1280]}``.
A pipeline holds at most one style at a time (``StyleSlot``): switching to another story's embedding
first removes the previous token from both tokenizers and encoders (or puts back the rows it replaced),
so a token never leaks from one request into the next, even when two stories use the same keyword.

A keyword that is one token of both vocabularies (CLIP's BPE: "Dramatic" is ``dramatic</w>``) gets its
own rows overwritten in place, as the reference's ``set_XLembedding`` does and as style-trainer trains
it; any other keyword is added as a new token to both tokenizers, as style-trainer adds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamframe.errors import InvalidArgument

ENCODER_KEYS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP bigG)


@dataclass(frozen=True)
class StyleEmbedding:
    token: str
    clip_l: torch.Tensor  # [d1]
    clip_g: torch.Tensor  # [d2]
    sha256: str


def parse_style_embedding(
    data: bytes, *, token: str, sha256: str, field: str = "style_embedding"
) -> StyleEmbedding:
    """Read the safetensors bytes; errors name ``field``."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - the library raises several types for corrupt files
        raise InvalidArgument(f"not a safetensors file: {exc}", field=field) from None
    rows: dict[str, torch.Tensor] = {}
    for key in ENCODER_KEYS:
        tensor = tensors.get(key)
        if tensor is None:
            raise InvalidArgument(
                f"has no {key!r} tensor (found {sorted(tensors)}); "
                "expected clip_l [1, d1] and clip_g [1, d2]",
                field=field,
            )
        if tensor.ndim == 2 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 1:
            raise InvalidArgument(
                f"{key} must be one vector [1, d], got shape {list(tensor.shape)}", field=field
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise InvalidArgument(f"{key} must hold finite floating-point values", field=field)
        rows[key] = tensor.float()
    return StyleEmbedding(validate_token(token), rows["clip_l"], rows["clip_g"], sha256)


def validate_token(token: str, field: str = "style_token") -> str:
    if not token or token != token.strip() or any(c.isspace() for c in token):
        raise InvalidArgument(f"must be one word without spaces, got {token!r}", field=field)
    return token


def encoder_dims(pipe) -> tuple[int, int]:
    """Embedding widths of the base pipeline's two text encoders."""
    return (
        pipe.text_encoder.get_input_embeddings().embedding_dim,
        pipe.text_encoder_2.get_input_embeddings().embedding_dim,
    )


def check_fits(style: StyleEmbedding, pipe, field: str = "style_embedding") -> None:
    for key, row, want in zip(ENCODER_KEYS, (style.clip_l, style.clip_g), encoder_dims(pipe), strict=True):
        if row.shape[0] != want:
            raise InvalidArgument(
                f"{key} has {row.shape[0]} dimensions but the model's text encoder needs {want} "
                "(an embedding trained for another model?)",
                field=field,
            )


class StyleSlot:
    """The one style embedding loaded into a base pipeline's tokenizers and text encoders.

    The refiner needs nothing loaded: the renderer hands it the base's text_encoder_2 embeddings."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.current: tuple[str, str] | None = None  # (token, sha256)
        # (table, row index, original row) per encoder while a vocabulary word's rows are replaced.
        self._replaced: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def _pairs(self):
        p = self.pipe
        return ((p.tokenizer, p.text_encoder), (p.tokenizer_2, p.text_encoder_2))

    def apply(self, style: StyleEmbedding | None) -> bool:
        """Make ``style`` (or no style) the loaded one; returns whether anything changed."""
        wanted = (style.token, style.sha256) if style is not None else None
        if wanted == self.current:
            return False
        self.clear()
        if style is None:
            return True
        check_fits(style, self.pipe)
        ids = self._vocabulary_ids(style.token)
        if ids is not None:
            # Adding a vocabulary word as a new token would also split every word that contains it
            # ("Art" turns "party" into p/art/y); its own rows are what style-trainer trained.
            with torch.no_grad():
                for (_, encoder), token_id, row in zip(
                    self._pairs(), ids, (style.clip_l, style.clip_g), strict=True
                ):
                    weight = encoder.get_input_embeddings().weight
                    self._replaced.append((weight, token_id, weight[token_id].clone()))
                    weight[token_id] = row.to(device=weight.device, dtype=weight.dtype)
            self.current = wanted
            return True
        for tokenizer, _ in self._pairs():
            if style.token in tokenizer.get_vocab():
                raise InvalidArgument(
                    f"{style.token!r} is already a word of the model's vocabulary; bind the embedding to a "
                    "token the tokenizer does not know (e.g. <name>)",
                    field="style_token",
                )
        loaded = []
        try:
            for (tokenizer, encoder), row in zip(self._pairs(), (style.clip_l, style.clip_g), strict=True):
                self.pipe.load_textual_inversion(
                    row.to(encoder.dtype)[None], token=style.token, tokenizer=tokenizer, text_encoder=encoder
                )
                loaded.append((tokenizer, encoder))
        except Exception:
            for tokenizer, encoder in loaded:
                self.pipe.unload_textual_inversion(style.token, tokenizer=tokenizer, text_encoder=encoder)
            raise
        self.current = wanted
        return True

    def _vocabulary_ids(self, token: str) -> tuple[int, int] | None:
        """The token's ids when it is one ordinary token in both tokenizers, else None."""
        ids = []
        for tokenizer, _ in self._pairs():
            encoded = tokenizer(token, add_special_tokens=False).input_ids
            if len(encoded) != 1:
                return None
            if encoded[0] in tokenizer.all_special_ids:
                raise InvalidArgument(
                    f"{token!r} is one of the tokenizer's special tokens; choose another word",
                    field="style_token",
                )
            ids.append(encoded[0])
        return ids[0], ids[1]

    def clear(self) -> None:
        if self.current is None:
            return
        if self._replaced:
            with torch.no_grad():
                for weight, token_id, original in self._replaced:
                    weight[token_id] = original
            self._replaced = []
            self.current = None
            return
        token = self.current[0]
        for tokenizer, encoder in self._pairs():
            self.pipe.unload_textual_inversion(token, tokenizer=tokenizer, text_encoder=encoder)
        self.current = None
