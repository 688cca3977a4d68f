"""The SDXL presets: the tiny one goes through the same save/load code as the real one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_checks import render_base_refiner

from dreamframe.errors import InvalidArgument
from dreamframe.models import sdxl

PROMPT = "generate an image in Noir style: at a bar, a man looks like Tom Hanks in blue is sitting"


def render(pipes: sdxl.SDXLPipelines, seed: int = 20) -> np.ndarray:
    return render_base_refiner(pipes, PROMPT, seed)


def test_tiny_preset_loads_from_disk_like_a_real_model(tmp_path):
    loaded = sdxl.load_sdxl("tiny", cache_dir=tmp_path, device="cpu")
    assert (tmp_path / f"tiny-sdxl-v{sdxl.TINY_VERSION}" / "base" / "model_index.json").exists()
    # one copy of the shared components
    assert loaded.refiner.text_encoder_2 is loaded.base.text_encoder_2
    assert loaded.refiner.vae is loaded.base.vae
    assert loaded.refiner.tokenizer_2 is loaded.base.tokenizer_2
    assert loaded.resolution == 64

    in_memory = sdxl.build_tiny_sdxl()
    a, b = render(loaded), render(in_memory)
    assert a.shape == (64, 64, 3)
    # Same weights (checked exactly below); pixels may differ by float rounding, at most one level.
    assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 1e-3
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(loaded.base, name).state_dict(), getattr(in_memory.base, name).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), f"{name} weights changed on the round trip"
    assert not np.array_equal(a, render(loaded, seed=21)), "different seeds give different images"


def test_cache_is_reused(tmp_path):
    first = sdxl.tiny_sdxl_dir(tmp_path)
    stamp = (first / "base" / "model_index.json").stat().st_mtime_ns
    assert sdxl.tiny_sdxl_dir(tmp_path) == first
    assert (first / "base" / "model_index.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-sdxl-")], "no temp dirs left"


def test_resolve_paths(tmp_path):
    assert sdxl.resolve_paths("sdxl", {}, tmp_path) == sdxl.HUB_IDS["sdxl"]
    assert sdxl.resolve_paths("sdxl", {"sdxl": "/models/sdxl"}, tmp_path) == (
        "/models/sdxl/base",
        "/models/sdxl/refiner",
    )
    assert sdxl.resolve_paths("mine", {"mine.base": "/b", "mine.refiner": "/r"}, tmp_path) == ("/b", "/r")
    with pytest.raises(InvalidArgument) as info:
        sdxl.resolve_paths("sd15", {}, tmp_path)
    assert info.value.field == "options.preset"


def test_byte_tokenizer_covers_any_text():
    tok = sdxl.clip_byte_tokenizer()
    ids = tok("Ünïcödé — 漢字 Noir", padding="max_length", truncation=True).input_ids
    assert len(ids) == 77
    assert tok.unk_token_id not in ids[1 : ids.index(tok.eos_token_id)]


def test_pooling_stays_at_end_of_text_when_a_style_token_is_added(tmp_path):
    pipes = sdxl.load_sdxl("tiny", cache_dir=tmp_path, device="cpu")
    te, tok = pipes.base.text_encoder_2, pipes.base.tokenizer_2
    # SDXL's published configs say eos_token_id=2, which pools at the largest id (an added token).
    for module in te.modules():
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = 2
    tok.add_tokens("<noir>")
    te.resize_token_embeddings(len(tok))
    ids = tok("a <noir> scene", return_tensors="pt").input_ids
    eos_at = (ids[0] == tok.eos_token_id).nonzero()[0].item()

    def pooled_position() -> int:
        out = te(ids)
        projected = te.text_projection(out.last_hidden_state[0])
        return next(
            i for i in range(ids.shape[1]) if torch.allclose(projected[i], out.text_embeds[0], atol=1e-5)
        )

    assert pooled_position() != eos_at, "the SDXL config pools at the added token"
    sdxl.pool_at_end_of_text(pipes.base)
    assert pooled_position() == eos_at


def test_sdxl_random_preset_loads_the_real_architecture_without_weights():
    """``sdxl-random`` goes through load_sdxl like any preset (shapes only here: device meta)."""
    pipes = sdxl.load_sdxl(sdxl.SDXL_RANDOM, device="meta", with_refiner=True)
    assert pipes.preset == sdxl.SDXL_RANDOM and pipes.resolution == 1024
    assert pipes.refiner is not None and pipes.refiner.text_encoder_2 is pipes.base.text_encoder_2
    assert sum(p.numel() for p in pipes.base.unet.parameters()) > 2.5e9
    # A configured folder wins over the snapshot in the cache (tests/test_models_snapshots.py writes one).
    assert sdxl.resolve_paths(sdxl.SDXL_RANDOM, {"sdxl-random": "/m"}, Path(".")) == ("/m/base", "/m/refiner")
