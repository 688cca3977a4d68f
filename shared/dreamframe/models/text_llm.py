"""Text LLM presets for the local backend of plot-llm (and anything else that needs a chat model).

- ``tiny``: a randomly initialised Llama-style causal LM (two layers, 64 wide) with an offline byte-level
  BPE tokenizer trained in code on a built-in corpus. Built once from a fixed seed, saved with
  ``save_pretrained`` into the model cache and loaded back by path, so the tiny preset runs exactly the
  loading code a real model does. Its text is random; with grammar-constrained decoding it still writes
  schema-valid JSON.
- anything else: a local directory or hub id of a causal LM with a chat template (``AutoTokenizer`` +
  ``AutoModelForCausalLM``). Nothing downloads when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dreamframe.errors import FailedPrecondition
from dreamframe.models import build_once
from dreamframe.models.device import pick_device, pick_dtype

TINY = "tiny"
# Bump when the tiny configs or corpus change, so stale caches are rebuilt instead of reused.
TINY_VERSION = 1
TINY_SEED = 4321
TINY_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

# Role markers on their own line, each message closed by the end-of-sequence token. The template runs
# with trim_blocks, so newlines are written as '\n' expressions rather than literally.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)

# What the tiny tokenizer learns its merges from: JSON punctuation and the words our prompts and
# answers use, so prompts stay short in tokens. Content is irrelevant to a random model.
_CORPUS = (
    '{"title": "The Last Lighthouse", "overview": "A keeper and a stranger", "style_keyword": "Dramatic"}',
    '{"locations": ["the old harbour", "a quiet kitchen", "the train station"], "characters": []}',
    '{"name": "Tom", "gender": "man", "looks_like": "Tom Hanks", "colour": "blue"}',
    '{"name": "Anna", "gender": "woman", "looks_like": "Emma Stone", "colour": "red"}',
    '{"scene": "at the harbour at dawn", "content": "They meet and argue.", "qa": {"what": {}}}',
    '{"question": "What does Tom find?", "answer": "A letter."}',
    '{"question": "Why does Anna leave?", "answer": "She is afraid."}',
    '{"question": "How do they escape?", "answer": "By boat."}',
    '{"question": "Where do they meet?", "answer": "At the station."}',
    '{"frames": [{"location": "the park", "character": "Tom", "action": "standing", "detail": "by a tree"}]}',
    '{"dialogues": [{"after_frame": 1, "speaker": "Anna", "line": "We have to go now."}]}',
    '{"tiny_stories": [{"content": "Tom opens the door.", "characters": ["Tom"]}]}',
    "generate an image in Dramatic style: at the old harbour, Tom is standing and looking at the sea",
    "a man looks like Tom Hanks in blue; a woman looks like Emma Stone in red",
    "standing sitting looking talking holding squatting walking hugging smiling laughing crying frowning",
    "You write movie stories as JSON. Answer with one JSON object that matches the schema.",
    "Theme: Write the story. Characters, locations, substories, tiny stories, frames, dialogues, QA.",
    "The answer did not pass validation. Fix these problems and answer again with the whole JSON.",
    "type object properties required items array string integer enum pattern minItems maxItems",
    "additionalProperties false description minimum maximum $defs $ref title",
    "what why how where who when the a an and of to in at on with is are was for from by",
    "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,;:!?'-()[]{}\"",
)


@dataclass
class TextLLM:
    """A loaded chat model: weights on ``device``, its tokenizer (with a chat template) and its name."""

    model: object  # transformers PreTrainedModel (causal LM)
    tokenizer: object  # transformers PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code (milliseconds, offline) with a chat template.
    Byte-level, so it encodes any text; special tokens <unk> <s> </s> <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    unk, bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=CHAT_TEMPLATE,
        model_max_length=16384,
        padding_side="left",
    )


def build_tiny_text_llm(seed: int = TINY_SEED) -> TextLLM:
    """The tiny preset in memory (fp32, CPU): same seed and config → same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Prompts carry the answer's JSON schema; RoPE makes a long context free for a tiny model.
        max_position_embeddings=16384,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return TextLLM(model, tok, TINY, torch.device("cpu"), torch.float32)


def save_text_llm(llm: TextLLM, directory: Path) -> None:
    """``save_pretrained`` of the model (safetensors) and tokenizer into one directory."""
    directory = Path(directory)
    llm.model.save_pretrained(directory, safe_serialization=True)
    llm.tokenizer.save_pretrained(directory)


def tiny_text_llm_dir(cache_dir: Path) -> Path:
    """The tiny preset on disk, built on first use into a temp dir and renamed, so concurrent processes
    never see a half-written model."""
    return build_once(
        Path(cache_dir) / f"tiny-text-llm-v{TINY_VERSION}",
        lambda tmp: save_text_llm(build_tiny_text_llm(), tmp),
        complete=lambda target: (target / "config.json").exists() and (target / "tokenizer.json").exists(),
        tmp_prefix=".tiny-text-llm-",
    )


def load_text_llm(
    name_or_path: str,
    *,
    cache_dir: Path = Path(".dreamframe/models"),
    device: str = "auto",
    dtype: torch.dtype | None = None,
) -> TextLLM:
    """Load ``tiny`` (from the model cache, built on first use) or a local path / hub id, once per call
    site: callers keep the result for the life of the process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    path = str(tiny_text_llm_dir(cache_dir)) if name_or_path == TINY else name_or_path
    dev = pick_device(device)
    dt = dtype or pick_dtype(dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(
            f"cannot load text model {name_or_path!r}: {exc}", field="options.model"
        ) from exc
    if tokenizer.chat_template is None:
        raise FailedPrecondition(f"text model {name_or_path!r} has no chat template", field="options.model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    return TextLLM(model, tokenizer, name_or_path, dev, dt)
