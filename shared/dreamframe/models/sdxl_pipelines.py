"""What the SDXL loader (``dreamframe.models.sdxl``) and the random-weights builder
(``dreamframe.models.sdxl_configs``) both need: the preset names, the ``SDXLPipelines`` record, the offline
CLIP tokenizer and end-of-text pooling. Both import this module; it imports neither (callers keep using
``dreamframe.models.sdxl``, which re-exports these names)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamframe.models.snapshot_cache import SDXL_RANDOM

TINY = "tiny"
SDXL = "sdxl"
PRESETS = (TINY, SDXL, SDXL_RANDOM)


@dataclass
class SDXLPipelines:
    base: object  # StableDiffusionXLPipeline
    refiner: object | None  # StableDiffusionXLImg2ImgPipeline
    preset: str
    # Image side the model was trained for (tiny: 64, SDXL: 1024).
    resolution: int
    device: torch.device
    dtype: torch.dtype


def clip_byte_tokenizer(model_max_length: int = 77):
    """An offline CLIP tokenizer over the 256 byte symbols (and their ``</w>`` forms), no merges:
    covers any text, needs no download, and behaves like CLIP's tokenizer for padding/truncation."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tok.model_max_length = model_max_length  # a hand-built CLIPTokenizer otherwise says 1e30
    return tok


def pool_at_end_of_text(pipe) -> None:
    """Make both text encoders pool at the tokenizer's real end-of-text token.

    SDXL's published CLIP configs say ``eos_token_id=2``, which makes transformers pool at the *largest*
    token id. A style token added by textual inversion has the largest id, so the pooled embedding would
    jump to it: trained one way, rendered another. Pointing both at ``<|endoftext|>`` keeps pooling where
    SDXL was trained, with or without added tokens."""
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        if encoder is None or tokenizer is None:
            continue
        encoder.config.eos_token_id = tokenizer.eos_token_id
        # The pooling module keeps its own copy (the model itself or its `text_model`, by version).
        for module in encoder.modules():
            if hasattr(module, "eos_token_id"):
                module.eos_token_id = tokenizer.eos_token_id
