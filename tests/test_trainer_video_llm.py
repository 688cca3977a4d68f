"""The video-LLM presets (shared/dreamframe/models/video_llm.py): tiny build + save/load round trip,
inputs with answer-only labels, uniform frame sampling from mp4, generation."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from test_trainer_support import tiny_cache

from dreamframe.errors import InvalidArgument
from dreamframe.models import video_llm


@pytest.fixture(scope="module")
def tiny():
    path = video_llm.resolve_model_path("tiny", cache_dir=tiny_cache())
    model, processor = video_llm.load_video_llm(path, "cpu")
    return path, model, processor


def _mp4_of_colours(colours: list[int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for value in colours:
            frame = np.full((size, size, 3), value, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_uniform_indices():
    assert video_llm.uniform_indices(8, 4) == [1, 3, 5, 7]
    assert video_llm.uniform_indices(3, 3) == [0, 1, 2]
    assert video_llm.uniform_indices(2, 4) == [0, 0, 1, 1]  # short videos repeat frames
    with pytest.raises(InvalidArgument):
        video_llm.uniform_indices(0, 4)


def test_read_video_frames_samples_uniformly():
    colours = [0, 40, 80, 120, 160, 200]
    frames = video_llm.read_video_frames(_mp4_of_colours(colours), 3)
    assert len(frames) == 3 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    means = [float(np.asarray(f).mean()) for f in frames]
    # Centres of three equal segments of six frames: frames 1, 3, 5.
    assert means == pytest.approx([40, 120, 200], abs=6)


def test_tiny_round_trip_is_identical(tmp_path, tiny):
    _, model, processor = tiny
    video_llm.save_video_llm(model, processor, tmp_path / "copy")
    model2, processor2 = video_llm.load_video_llm(tmp_path / "copy", "cpu")
    assert model2.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {
        "_name_or_path": ""
    }
    frames = video_llm.random_frames(4, seed=3)
    inputs = video_llm.prepare_inputs(processor, frames, "What happens?")
    inputs2 = video_llm.prepare_inputs(processor2, frames, "What happens?")
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model2(**inputs2).logits)
    answer = video_llm.generate(model, processor, frames, "What happens?", max_new_tokens=6)
    assert answer == video_llm.generate(model2, processor2, frames, "What happens?", max_new_tokens=6)


def test_inputs_label_only_the_answer(tiny):
    _, _, processor = tiny
    frames = video_llm.random_frames(4)
    inputs = video_llm.prepare_inputs(processor, frames, "What happens?", "A man walks.")
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    assert inputs["pixel_values"].shape == (4, 3, 32, 32)
    assert int((ids == processor.image_token_id).sum()) == 4 * video_llm.image_token_count(processor) == 64
    answer = processor.tokenizer.decode(ids[labels != -100])
    assert answer.strip() == "A man walks.</s>"
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    prompt = processor.tokenizer.decode(ids[labels == -100])
    assert "What happens?" in prompt and "A man walks" not in prompt


def test_generation_prompt_and_answer_prefix(tiny):
    _, model, processor = tiny
    frames = video_llm.random_frames(2)
    inputs = video_llm.prepare_inputs(processor, frames, "Which option?")
    assert "labels" not in inputs
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert text.endswith("Which option? ASSISTANT:")
    out = video_llm.generate(
        model, processor, frames, "Which option?", max_new_tokens=2, answer_prefix="Best option:("
    )
    assert isinstance(out, str)


def test_resolve_model_path(tmp_path):
    assert video_llm.resolve_model_path("llava-1.5-7b") == "llava-hf/llava-1.5-7b-hf"
    assert video_llm.resolve_model_path("llava-1.5-7b", {"llava-1.5-7b": "/models/llava"}) == "/models/llava"
    assert video_llm.resolve_model_path("/some/checkpoint") == "/some/checkpoint"
    with pytest.raises(InvalidArgument) as err:
        video_llm.resolve_model_path("")
    assert err.value.field == "base_model"


def test_llava_7b_architecture_on_meta_device():
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(video_llm.llava_7b_config())
    total = sum(p.numel() for p in model.parameters())
    # CLIP ViT-L/14-336 (~303 M) + projector (~21 M) + Vicuna-7B (~6.74 B)
    assert 7.0e9 < total < 7.1e9


def test_a_prompt_longer_than_the_models_positions_is_refused_naming_num_frames(tiny):
    """The tiny model has 1,024 positions and 16 tokens a frame: 64 frames fit, 70 do not."""
    _, model, processor = tiny
    assert video_llm.generate(model, processor, video_llm.random_frames(8), "What happens?", max_new_tokens=2)
    with pytest.raises(InvalidArgument) as err:
        video_llm.generate(model, processor, video_llm.random_frames(70), "What happens?", max_new_tokens=2)
    assert err.value.field == "num_frames" and "more than the model's 1,024 positions" in err.value.message
