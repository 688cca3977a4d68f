"""Style consistency: a tiny random CLIP-style encoder (built from a config, saved, loaded back by path)
finds keyframes of one palette more alike than keyframes of two palettes."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from test_eval_support import BLUE, GREEN, RED, make_store, png_bytes, write_story_frames

from dreamframe.models.clip_vision import build_tiny_clip_vision, load_clip_vision, tiny_clip_vision_dir
from services.evaluator.benchmarks.base import Location
from services.evaluator.sources import StoreSource
from services.evaluator.style import across_mean, style_consistency, within_mean


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_clip_vision("tiny", cache_dir=tmp_path_factory.mktemp("models"), device="cpu")


def test_tiny_encoder_loads_by_path_like_a_real_one(tmp_path, encoder) -> None:
    path = tiny_clip_vision_dir(tmp_path)
    assert (path / "config.json").exists() and (path / "preprocessor_config.json").exists()
    assert tiny_clip_vision_dir(tmp_path) == path  # built once
    image = Image.open(io.BytesIO(png_bytes(RED))).convert("RGB")
    model, processor = build_tiny_clip_vision()
    with torch.no_grad():
        direct = model(**processor(images=[image], return_tensors="pt")).image_embeds
    loaded = encoder.embed([image])
    assert torch.allclose(loaded, torch.nn.functional.normalize(direct, dim=-1), atol=1e-5)
    assert loaded.norm(dim=-1).item() == pytest.approx(1.0)
    with pytest.raises(Exception, match="cannot load image encoder"):
        load_clip_vision(str(tmp_path / "nowhere"), device="cpu")


def test_pair_means_match_brute_force() -> None:
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    sims = a @ a.T
    brute_within = (sims.sum() - sims.diag().sum()) / (5 * 4)
    assert within_mean(a) == pytest.approx(float(brute_within), abs=1e-6)
    assert across_mean(a, b) == pytest.approx(float((a @ b.T).mean()), abs=1e-6)
    assert within_mean(a[:1]) is None


def test_one_palette_per_story_scores_higher_within_than_across(tmp_path, encoder) -> None:
    store = make_store(tmp_path)
    source = StoreSource(store)
    stories = [
        (p, Location(source, p))
        for p in (
            write_story_frames(store, "jobs/j/stories/000/frames/", RED, count=4, seed=1),
            write_story_frames(store, "jobs/j/stories/001/frames/", BLUE, count=4, seed=2),
            write_story_frames(store, "jobs/j/stories/002/frames/", GREEN, count=4, seed=3),
        )
    ]
    stories.append(("jobs/j/stories/003/frames/", Location(source, "jobs/j/stories/003/frames/")))  # empty
    result = style_consistency(encoder, stories, max_frames=3)
    rows = {r.task: r for r in result.rows}
    assert rows["within_story"].score > rows["across_stories"].score
    assert rows["gap"].score == pytest.approx(rows["within_story"].score - rows["across_stories"].score)
    assert rows["across_stories"].extra == {"story_pairs": 3} and rows["within_story"].items == 9
    assert [s["frames"] for s in result.stories] == [3, 3, 3]
    assert [e.reason for e in result.errors] == ["no frame images under this prefix"]

    # Mixed palettes inside each story: the gap closes.
    mixed = [
        write_story_frames(store, "mix/a/", RED, count=2, seed=4),
        write_story_frames(store, "mix/b/", RED, count=2, seed=5),
    ]
    for i, colour in enumerate((BLUE, BLUE)):
        store.put_bytes(f"mix/a/{10 + i:06d}.png", png_bytes(colour, seed=10 + i))
        store.put_bytes(f"mix/b/{10 + i:06d}.png", png_bytes(colour, seed=20 + i))
    mixed_rows = {
        r.task: r for r in style_consistency(encoder, [(p, Location(source, p)) for p in mixed]).rows
    }
    assert mixed_rows["gap"].score < rows["gap"].score
