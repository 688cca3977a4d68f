"""keyframe-renderer without a model: options, frame selection, prompts, PNG encoding, embedding files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save

from dreamframe.errors import InvalidArgument
from dreamframe.story import Character, Story, StoryItem, Substory, TinyStory
from services.keyframe_renderer import frames, options, prompts, style
from services.keyframe_renderer.options import FrameSelection, RenderOptions


def resolve(**kwargs) -> options.RenderParams:
    return options.resolve_options(
        RenderOptions(**kwargs), preset="tiny", resolution=64, default_batch_size=0, compile_default=False
    )


def test_zero_means_the_reference_defaults():
    params = resolve()
    assert (params.steps, params.high_noise_fraction, params.guidance_scale) == (40, 0.75, 5.0)
    assert (params.width, params.height) == (64, 64)  # the preset's resolution (1024 for sdxl)
    assert params.seed(0) == 20 and params.seed(7) == 27
    assert params.negative_prompt == options.DEFAULT_NEGATIVE_PROMPT and len(params.negative_prompt) > 300
    assert params.use_refiner and not params.overwrite and params.batch_size == 0
    custom = resolve(
        steps=12, high_noise_fraction=0.5, width=128, height=96, seed_offset=5, negative_prompt=" x "
    )
    assert (custom.steps, custom.high_noise_fraction, custom.width, custom.height) == (12, 0.5, 128, 96)
    assert custom.seed(3) == 8 and custom.negative_prompt == "x"
    # Batch size never changes the picture, so it is not part of what identifies a frame.
    assert resolve(batch_size=1).image_settings() == resolve(batch_size=8).image_settings()
    assert resolve(disable_refiner=True).image_settings()["refiner"] is False


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": -1}, "options.steps"),
        ({"steps": 5000}, "options.steps"),
        ({"high_noise_fraction": 1.0}, "options.high_noise_fraction"),
        ({"high_noise_fraction": -0.1}, "options.high_noise_fraction"),
        ({"width": 100}, "options.width"),
        ({"height": -8}, "options.height"),
        ({"height": 8192}, "options.height"),
        ({"guidance_scale": -1.0}, "options.guidance_scale"),
        ({"seed_offset": -3}, "options.seed_offset"),
        ({"batch_size": -1}, "options.batch_size"),
        ({"batch_size": 1000}, "options.batch_size"),
    ],
)
def test_bad_options_name_their_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        resolve(**kwargs)
    assert info.value.field == field


def test_frame_selection():
    assert options.select_frames(FrameSelection(), 4) == [0, 1, 2, 3]
    assert options.select_frames(FrameSelection("range", start=1, end=3), 4) == [1, 2]
    assert options.select_frames(FrameSelection("list", indices=(3, 0)), 4) == [3, 0]


@pytest.mark.parametrize(
    ("selection", "field"),
    [
        (FrameSelection("list", indices=(0, 1, 2, 9)), "frames.list.indices.3"),
        (FrameSelection("list", indices=(-1,)), "frames.list.indices.0"),
        (FrameSelection("list", indices=(1, 2, 1)), "frames.list.indices.2"),
        (FrameSelection("list", indices=()), "frames.list.indices"),
        (FrameSelection("range", start=4, end=5), "frames.range.start"),
        (FrameSelection("range", start=1, end=9), "frames.range.end"),
        (FrameSelection("range", start=2, end=2), "frames.range.end"),
    ],
)
def test_bad_selection_names_the_index(selection, field):
    with pytest.raises(InvalidArgument) as info:
        options.select_frames(selection, 4)
    assert info.value.field == field


def test_story_without_frames_is_refused():
    with pytest.raises(InvalidArgument) as info:
        options.select_frames(FrameSelection(), 0)
    assert info.value.field == "story"


def test_style_token_replaces_the_keyword_in_the_prompt_prefix():
    story = Story(
        overview="o",
        style_keyword="Noir",
        characters=[Character(name="Ann", appearance="a woman looks like Emma Stone in red")],
        substories=[
            Substory(
                tiny_stories=[
                    TinyStory(
                        items=[
                            StoryItem(kind="frame", text="Ann sits in a Noir bar"),
                            StoryItem(kind="dialogue", text="Ann: hello"),
                            StoryItem(kind="frame", text="Ann walks"),
                        ]
                    )
                ]
            )
        ],
    )
    same = prompts.frame_prompts(story, [0, 1], "Noir")
    assert same == {
        0: "generate an image in Noir style: a woman looks like Emma Stone in red sits in a Noir bar",
        1: "generate an image in Noir style: a woman looks like Emma Stone in red walks",
    }
    # Only the style prefix changes; the scene text keeps its words.
    assert prompts.frame_prompts(story, [0], "<noir>")[0] == (
        "generate an image in <noir> style: a woman looks like Emma Stone in red sits in a Noir bar"
    )
    assert prompts.frame_prompts(story, [1], "")[1] == same[1]
    assert (
        prompts.with_style_token("a plain prompt", "<s>") == "generate an image in <s> style: a plain prompt"
    )


def recipe(**overrides) -> frames.FrameRecipe:
    values = dict(
        index=3,
        prompt="generate an image in Noir style: a café — 東京",
        seed=23,
        model="tiny-v1",
        settings=resolve().image_settings(),
        style_token="<noir>",
        style_embedding_sha256="ab" * 32,
    )
    return frames.FrameRecipe(**{**values, **overrides})


def test_png_encoding_is_deterministic_and_carries_the_recipe():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    first = frames.encode_png(pixels, frames.png_text(recipe()))
    assert first == frames.encode_png(pixels.copy(), frames.png_text(recipe()))
    text = frames.read_png_text(first)
    assert text["prompt"] == recipe().prompt  # non-latin text survives (iTXt)
    assert (text["seed"], text["model"], text["steps"], text["style_token"]) == (
        "23",
        "tiny-v1",
        "40",
        "<noir>",
    )
    assert text["negative_prompt"] == options.DEFAULT_NEGATIVE_PROMPT
    import io

    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first))), pixels)
    assert frames.encode_png(pixels, frames.png_text(recipe(seed=24))) != first


def embedding_bytes(**tensors: torch.Tensor) -> bytes:
    return save(tensors)


def test_style_embedding_file_is_checked():
    good = embedding_bytes(clip_l=torch.randn(1, 32), clip_g=torch.randn(1, 48))
    parsed = style.parse_style_embedding(good, token="<noir>", sha256="x")
    assert parsed.clip_l.shape == (32,) and parsed.clip_g.shape == (48,)
    bad = [
        b"not a safetensors file",
        embedding_bytes(clip_l=torch.randn(1, 32)),
        embedding_bytes(clip_l=torch.randn(2, 32), clip_g=torch.randn(1, 48)),
        embedding_bytes(clip_l=torch.full((1, 32), float("nan")), clip_g=torch.randn(1, 48)),
    ]
    for data in bad:
        with pytest.raises(InvalidArgument) as info:
            style.parse_style_embedding(data, token="<noir>", sha256="x")
        assert info.value.field == "style_embedding"
    with pytest.raises(InvalidArgument) as info:
        style.parse_style_embedding(good, token="two words", sha256="x")
    assert info.value.field == "style_token"


# --- engine settings (no model needed) --------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sdpa_backend": "fastest"}, "sdpa_backend"),
        ({"compile_mode": "turbo"}, "compile_mode"),
        ({"fuse_qkv": "yes"}, "fuse_qkv"),
        ({"compile_vae": 1}, "compile_vae"),
    ],
)
def test_bad_engine_options_name_their_field(kwargs, field):
    from services.keyframe_renderer.engine import EngineOptions

    with pytest.raises(ValueError, match=rf"^{field}: "):
        EngineOptions(**kwargs)


def test_bad_renderer_settings_name_their_field(monkeypatch):
    from pydantic import ValidationError

    from dreamframe.config import load_settings
    from services.keyframe_renderer.settings import RendererSettings

    with pytest.raises(ValidationError, match="sdpa_backend"):
        RendererSettings(sdpa_backend="fastest")
    monkeypatch.setenv("DREAMFRAME_RENDERER__SDPA_BACKEND", "cuDNN9")
    with pytest.raises(ValidationError, match=r"renderer\.sdpa_backend"):
        load_settings()
    monkeypatch.setenv("DREAMFRAME_RENDERER__SDPA_BACKEND", "cudnn")
    monkeypatch.setenv("DREAMFRAME_RENDERER__FUSE_QKV", "false")
    renderer = load_settings().renderer
    assert renderer.sdpa_backend == "cudnn" and renderer.fuse_qkv is False


def test_engine_options_follow_the_settings():
    from services.keyframe_renderer.engine import EngineOptions
    from services.keyframe_renderer.settings import RendererSettings

    defaults = EngineOptions.from_settings(RendererSettings())
    assert defaults == EngineOptions()  # not compiled unless asked; fused QKV, VAE compiled with the UNets
    assert defaults.compile_mode == "" and defaults.fuse_qkv and defaults.compile_vae
    custom = RendererSettings(
        compile=True, compile_mode="reduce-overhead", sdpa_backend="flash", fuse_qkv=False
    )
    opts = EngineOptions.from_settings(custom)
    assert (opts.compile_mode, opts.sdpa_backend, opts.fuse_qkv) == ("reduce-overhead", "flash", False)
    assert EngineOptions.from_settings(custom, compile=False).compile_mode == ""


def test_inductor_settings_go_to_our_compile_only():
    import torch._inductor.config as inductor

    from services.keyframe_renderer.engine import INDUCTOR_TUNING, inductor_options

    before = (inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning, inductor.epilogue_fusion)
    assert inductor_options("default", tuning=False) == {"conv_1x1_as_mm": True}
    tuned = inductor_options("reduce-overhead", tuning=True)
    assert tuned["triton.cudagraphs"] and tuned["conv_1x1_as_mm"]
    assert all(tuned[k] == v for k, v in INDUCTOR_TUNING.items())
    assert (inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning, inductor.epilogue_fusion) == before


def test_sdpa_context_prefers_the_chosen_kernel_and_keeps_the_others():
    from torch.nn.attention import SDPBackend

    from services.keyframe_renderer.engine import sdpa_context

    q = torch.randn(2, 2, 8, 16)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    for backend in ("auto", "cudnn", "flash", "efficient", "math"):
        with sdpa_context(backend):
            # cuDNN and memory-efficient kernels don't run on a CPU: the next one in line does.
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            if backend == "math":
                assert torch.backends.cuda.math_sdp_enabled()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the block
    assert SDPBackend.CUDNN_ATTENTION is not None
