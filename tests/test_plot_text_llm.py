"""The text LLM presets: the tiny one is built offline (tokenizer trained in code, random Llama), saved
once into the model cache and loaded back by path through the same code a real model uses."""

from __future__ import annotations

import pytest
import torch

from dreamframe.errors import FailedPrecondition
from dreamframe.models import text_llm

MESSAGES = [
    {"role": "system", "content": "You write stories."},
    {"role": "user", "content": "Theme: a storm at sea"},
]


def test_tiny_tokenizer_is_byte_level_and_has_a_chat_template():
    tok = text_llm.build_tiny_tokenizer()
    text = 'generate an image in Noir style: at the café, Tom is sitting {"x": [1]} \u2603'
    assert tok.decode(tok(text).input_ids) == text  # byte-level: any text round-trips
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert (
        prompt == "<|system|>\nYou write stories.</s>\n<|user|>\nTheme: a storm at sea</s>\n<|assistant|>\n"
    )
    # the merges learned from the built-in corpus make our prompts' words short in tokens
    assert (
        len(tok("generate an image in Dramatic style").input_ids)
        < len("generate an image in Dramatic style") / 2
    )


def test_tiny_preset_loads_from_the_cache_like_a_real_model(tmp_path):
    loaded = text_llm.load_text_llm("tiny", cache_dir=tmp_path, device="cpu")
    folder = tmp_path / f"tiny-text-llm-v{text_llm.TINY_VERSION}"
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    assert (folder / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-text-llm-")], "no temp dirs left"

    built = text_llm.build_tiny_text_llm()
    got, want = loaded.model.state_dict(), built.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert loaded.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False
    ) == built.tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    inputs = loaded.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    a = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    b = built.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)

    stamp = (folder / "config.json").stat().st_mtime_ns
    text_llm.load_text_llm("tiny", cache_dir=tmp_path, device="cpu")
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # built once, then reused


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FailedPrecondition) as info:
        text_llm.load_text_llm(str(tmp_path / "no-such-model"), device="cpu")
    assert info.value.field == "options.model"
