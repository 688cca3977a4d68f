"""CLIP's real BPE tokenizer (49,408 tokens), built offline from the vocabulary file open_clip ships.

SDXL's two tokenizers (``tokenizer``: CLIP ViT-L, ``tokenizer_2``: OpenCLIP bigG) are the same OpenAI
CLIP BPE: 256 byte symbols, the same with ``</w>``, 48,894 merges and ``<|startoftext|>`` /
``<|endoftext|>``. The merges come from ``bpe_simple_vocab_16e6.txt.gz`` inside the
``open_clip_torch==3.3.0`` wheel (PyPI), which ``make install`` and the images download next to the
interpreter (``<sys.prefix>/share/dreamframe/``) without installing it (it would pull torchvision).
The file's sha256 is checked, so every machine builds the same vocabulary: "a photo of a cat" →
``[49406, 320, 1125, 539, 320, 2368, 49407]``, as open_clip's and the hub's tokenizers give.

Where the file is looked for, in order: ``DREAMFRAME_CLIP_BPE`` (a ``.txt.gz`` or the wheel), the
wheel under ``<sys.prefix>/share/dreamframe/``, an installed ``open_clip`` package (found, not imported).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import sys
from pathlib import Path

from dreamframe.errors import FailedPrecondition
from dreamframe.models.packaged_files import candidates, read_checked

WHEEL_VERSION = "3.3.0"
WHEEL_NAME = f"open_clip_torch-{WHEEL_VERSION}-py3-none-any.whl"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of bpe_simple_vocab_16e6.txt.gz (the file OpenAI's CLIP repository and open_clip ship).
SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The hub's SDXL tokenizer_2 (OpenCLIP bigG) pads with "!" (id 0); tokenizer (CLIP-L) with <|endoftext|>.
PAD_CLIP_L, PAD_CLIP_G = EOS, "!"
INSTALL_HINT = (
    f"`make install` puts it there; by hand: pip download --no-deps --dest {sys.prefix}/share/dreamframe "
    f"open_clip_torch=={WHEEL_VERSION} (or set DREAMFRAME_CLIP_BPE to the wheel or the .txt.gz)"
)


def _candidates() -> list[Path]:
    found = candidates("DREAMFRAME_CLIP_BPE", WHEEL_NAME)
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) / Path(MEMBER).name for p in spec.submodule_search_locations]
    return found


@functools.cache
def vocabulary_file() -> bytes:
    """The gzipped BPE file's bytes (checked against its sha256)."""
    return read_checked(
        _candidates(),
        member=MEMBER,
        sha256=SHA256,
        what="CLIP's bpe_simple_vocab_16e6.txt.gz",
        field="preset",
        install_hint=INSTALL_HINT,
    )


def _bytes_to_unicode() -> list[str]:
    """The 256 byte symbols in CLIP's (GPT-2's) order: printable bytes first, the rest mapped above 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


@functools.cache
def vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token → id, merges) exactly as open_clip's SimpleTokenizer builds them."""
    lines = gzip.decompress(vocabulary_file()).decode("utf-8").split("\n")
    # The first line is a version header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise FailedPrecondition(
            f"CLIP's vocabulary has {len(tokens)} tokens, not {VOCAB_SIZE}", field="preset"
        )
    return {token: i for i, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(pad_token: str = PAD_CLIP_L, model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` over the real vocabulary (0.2 s)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    tok = CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
    )
    tok.model_max_length = model_max_length  # a hand-built CLIPTokenizer otherwise says 1e30
    return tok


def sdxl_tokenizers():
    """(tokenizer, tokenizer_2) as SDXL ships them: the same BPE, padded with <|endoftext|> and "!"."""
    return clip_tokenizer(PAD_CLIP_L), clip_tokenizer(PAD_CLIP_G)


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``save_pretrained`` (tokenizer.json + config) plus the hub's ``vocab.json`` and ``merges.txt``,
    so tools that read CLIP's plain files find them too."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    vocab, merges = vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
