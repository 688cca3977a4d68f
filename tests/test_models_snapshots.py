"""Random-weight snapshots (dreamframe.models.snapshots): each writer, given tiny configs, writes the
hub's layout into the model cache; the services' loaders load it by path through the preset name and
get exactly the model the writer built in memory. The real-size configs are checked on the meta device
(shapes and parameter counts only: writing them is for a GPU machine)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from model_checks import assert_same_conditioning, render_base_refiner

from dreamframe.models import clip_bpe, sdxl, snapshots, video_llm
from dreamframe.models.clip_vision import CLIP_L_RANDOM, load_clip_vision
from dreamframe.models.sdxl_configs import (
    build_random_sdxl,
    real_sdxl_base_configs,
    real_sdxl_refiner_unet_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "generate an image in Dramatic style: at a bar, a man looks like Tom Hanks in blue is sitting"


def tiny_sdxl_configs() -> tuple[dict[str, dict], dict]:
    """The real configs made small (same keys, same classes), with CLIP's real 49,408-token vocabulary."""
    c = real_sdxl_base_configs()
    c["unet"].update(
        sample_size=8,
        block_out_channels=[32, 64],
        layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4],
        norm_num_groups=8,
        cross_attention_dim=32 + 48,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 24,
        transformer_layers_per_block=1,
    )
    c["vae"].update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64)
    small = dict(num_hidden_layers=2, num_attention_heads=2)
    c["text_encoder"].update(hidden_size=32, intermediate_size=64, projection_dim=32, **small)
    c["text_encoder_2"].update(hidden_size=48, intermediate_size=96, projection_dim=24, **small)
    refiner = copy.deepcopy(c["unet"])
    refiner.update(cross_attention_dim=48, projection_class_embeddings_input_dim=5 * 8 + 24)
    return c, refiner


SDXL_ARGS = dict(device="cpu", dtype=torch.float32, seed=7)


def tiny_tokenizer():
    return snapshots.llama_size_tokenizer(400, corpus=snapshots.stdlib_corpus()[:12])


def tiny_llava_config(tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    base = video_llm.llava_7b_config()
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=14, projection_dim=16, hidden_act="quick_gelu",
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok) + 14, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act=base.projector_hidden_act,
        vision_feature_select_strategy=base.vision_feature_select_strategy,
        vision_feature_layer=base.vision_feature_layer,
    )  # fmt: skip


def _tiny_clip():
    config = snapshots.clip_vit_large_config()
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 32, 64, 2
    config.num_attention_heads, config.image_size, config.projection_dim = 2, 28, 16
    return config


@pytest.fixture(scope="module")
def tiny_registry():
    """The cache's writers with tiny configs: the presets' names resolve exactly as at real size."""
    configs, refiner = tiny_sdxl_configs()
    tok = tiny_tokenizer()
    writers = {
        snapshots.SDXL_RANDOM: lambda d: snapshots.write_sdxl(
            d, configs=configs, refiner_unet=refiner, **SDXL_ARGS
        ),
        snapshots.LLAVA_7B_RANDOM: lambda d: snapshots.write_video_llm(
            d, config=tiny_llava_config(tok), tokenizer=tok, device="cpu", dtype=torch.float32, seed=3
        ),
        snapshots.CLIP_L_RANDOM: lambda d: snapshots.write_clip_vision(
            d, config=_tiny_clip(), device="cpu", dtype=torch.float32, seed=5
        ),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, write in writers.items():
            mp.setitem(snapshots.SNAPSHOTS, name, dataclasses.replace(snapshots.SNAPSHOTS[name], write=write))
        yield {"sdxl": (configs, refiner), "tokenizer": tok}


@pytest.fixture(scope="module")
def sdxl_cache(tmp_path_factory, tiny_registry):
    """A model cache holding the tiny sdxl-random snapshot, written through the preset's name."""
    cache = tmp_path_factory.mktemp("sdxl-cache")
    sdxl.resolve_paths(sdxl.SDXL_RANDOM, {}, cache)
    return cache


# --- CLIP's real BPE -------------------------------------------------------------------------------


def test_clip_bpe_is_the_real_vocabulary():
    tok, tok2 = clip_bpe.sdxl_tokenizers()
    assert len(tok) == len(tok2) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # The reference's keyword is one token (lower-cased, end of word); a made-up one is several.
    assert tok.convert_ids_to_tokens(tok("Dramatic", add_special_tokens=False).input_ids) == ["dramatic</w>"]
    assert len(tok("Cyberpunkish", add_special_tokens=False).input_ids) == 3
    # SDXL pads CLIP-L with <|endoftext|> and bigG with "!" (id 0); both stop at 77 tokens.
    assert (tok.pad_token_id, tok2.pad_token_id, tok.model_max_length) == (49407, 0, 77)


def test_clip_bpe_refuses_a_wrong_file(tmp_path, monkeypatch):
    from dreamframe.errors import FailedPrecondition

    bad = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    bad.write_bytes(b"not it")
    monkeypatch.setenv("DREAMFRAME_CLIP_BPE", str(bad))
    clip_bpe.vocabulary_file.cache_clear()
    try:
        with pytest.raises(FailedPrecondition, match="sha256"):
            clip_bpe.vocabulary_file()
    finally:
        monkeypatch.delenv("DREAMFRAME_CLIP_BPE")
        clip_bpe.vocabulary_file.cache_clear()


# --- SDXL ------------------------------------------------------------------------------------------


def render(pipes, seed: int = 20) -> np.ndarray:
    return render_base_refiner(pipes, PROMPT, seed)


def test_sdxl_random_snapshot_loads_by_path_like_the_model_in_memory(sdxl_cache, tiny_registry):
    from services.keyframe_renderer.engine import load_engine

    configs, refiner = tiny_registry["sdxl"]
    root = sdxl_cache / "sdxl-random-v1"
    assert sorted(p.name for p in sdxl_cache.iterdir()) == ["sdxl-random-v1"]  # no temp folder left
    # The hub's layout: model_index.json, each component's config and weights, CLIP's tokenizer files.
    for path in (
        "base/model_index.json", "base/unet/config.json", "base/unet/diffusion_pytorch_model.safetensors",
        "base/vae/config.json", "base/text_encoder/model.safetensors", "base/text_encoder_2/config.json",
        "base/scheduler/scheduler_config.json", "base/tokenizer/vocab.json", "base/tokenizer/merges.txt",
        "base/tokenizer_2/tokenizer.json", "refiner/model_index.json", "refiner/unet/config.json",
    ):  # fmt: skip
        assert (root / path).is_file(), path
    index = json.loads((root / "base" / "model_index.json").read_text())
    assert (
        index["tokenizer"] == ["transformers", "CLIPTokenizer"] and index["unet"][1] == "UNet2DConditionModel"
    )
    # The published text-encoder configs (eos_token_id 2); the loader moves pooling to <|endoftext|>.
    assert json.loads((root / "base/text_encoder/config.json").read_text())["eos_token_id"] == 2

    # The style-trainer's and the renderer's loader (load_sdxl by preset name → the snapshot folder).
    loaded = sdxl.load_sdxl(sdxl.SDXL_RANDOM, cache_dir=sdxl_cache, device="cpu")
    assert len(loaded.base.tokenizer) == 49408 and loaded.base.tokenizer_2.pad_token == "!"
    assert loaded.refiner.text_encoder_2 is loaded.base.text_encoder_2 and loaded.resolution == 64
    memory = build_random_sdxl(
        with_refiner=True,
        configs=configs,
        refiner_unet=refiner,
        tokenizers=clip_bpe.sdxl_tokenizers(),
        **SDXL_ARGS,
    )
    for pipe, name in [(p, n) for p in ("base", "refiner") for n in ("unet", "vae", "text_encoder_2")]:
        want = getattr(getattr(memory, pipe), name).state_dict()
        got = getattr(getattr(loaded, pipe), name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), (pipe, name)
    assert np.array_equal(render(loaded), render(memory))
    # The renderer's engine loads it too.
    engine = load_engine(sdxl.SDXL_RANDOM, model_paths={}, cache_dir=sdxl_cache, device="cpu")
    assert engine.pipes.preset == sdxl.SDXL_RANDOM and len(engine.base.tokenizer) == 49408


# --- the style token with CLIP's vocabulary ---------------------------------------------------------


@pytest.mark.parametrize(("keyword", "single"), [("Dramatic", True), ("Cyberpunkish", False)])
def test_style_keyword_binds_alike_in_style_trainer_and_renderer(sdxl_cache, keyword, single):
    """The reference's keyword is one BPE token: its own row is trained and, in the renderer, overwritten
    in place (set_XLembedding); a keyword of several tokens is added as a new token in both."""
    from services.keyframe_renderer.style import StyleEmbedding as RenderStyle
    from services.keyframe_renderer.style import StyleSlot
    from services.style_trainer.embedding import apply_embedding
    from services.style_trainer.inversion import TextualInversion
    from services.style_trainer.options import TrainOptions

    def load():
        return sdxl.load_sdxl(sdxl.SDXL_RANDOM, cache_dir=sdxl_cache, device="cpu", with_refiner=False).base

    trainer_base = sdxl.load_sdxl(sdxl.SDXL_RANDOM, cache_dir=sdxl_cache, device="cpu", with_refiner=False)
    ti = TextualInversion(trainer_base, keyword, TrainOptions(max_train_steps=1, checkpoint_every=0))
    assert ti.added is not single
    assert ti.token_ids == ((11240, 11240) if single else (49408, 49408))  # dramatic</w> / a new token
    embedding = ti.embedding()  # its first rows: what is trained does not matter here

    renderer = load()
    table = renderer.text_encoder_2.get_input_embeddings().weight.detach().clone()
    prompt = f"generate an image in {keyword} style: at a party, a man is sitting"
    plain_ids = renderer.tokenizer(prompt).input_ids
    slot = StyleSlot(renderer)
    slot.apply(RenderStyle(keyword, embedding.clip_l, embedding.clip_g, "sha"))
    assert_same_conditioning(renderer, ti.pipeline, prompt)
    if single:  # nothing added: every other word tokenizes as before ("party" is not p/art/y)
        assert len(renderer.tokenizer) == 49408 and renderer.tokenizer(prompt).input_ids == plain_ids
    else:
        assert len(renderer.tokenizer) == len(renderer.tokenizer_2) == 49409
    slot.apply(None)
    assert len(renderer.tokenizer) == 49408
    assert torch.equal(renderer.text_encoder_2.get_input_embeddings().weight, table)
    # The reference's .pt, applied as the seed's generate.py does, conditions the same way.
    fresh = load()
    apply_embedding(fresh, embedding)
    assert_same_conditioning(fresh, ti.pipeline, prompt)


# --- the video LLM ---------------------------------------------------------------------------------


def test_llama_size_tokenizer_has_llava_hf_ids():
    tok = snapshots.llama_size_tokenizer()
    assert len(tok) == 32002
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")] == [
        0,
        1,
        2,
        32000,
        32001,
    ]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (32001, 1, 2, 0)
    config = video_llm.llava_7b_config()
    assert config.image_token_id == 32000 and config.text_config.pad_token_id == 32001
    assert config.text_config.vocab_size >= len(tok)
    text = "USER: <image>\nWhat is happening? ASSISTANT: A man walks."
    assert tok.decode(tok(text).input_ids, skip_special_tokens=False) == text
    assert tok(text).input_ids.count(32000) == 1


def test_video_llm_snapshot_loads_by_path_like_the_model_in_memory(tmp_path, tiny_registry):
    tok = tiny_registry["tokenizer"]
    path = video_llm.resolve_model_path(video_llm.LLAVA_7B_RANDOM, {}, tmp_path)
    assert path == str(tmp_path / "llava-1.5-7b-random-v1")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (tmp_path / "llava-1.5-7b-random-v1" / name).is_file(), name
    model, processor = video_llm.load_video_llm(path, "cpu")
    memory, memory_processor = snapshots.build_video_llm(
        config=tiny_llava_config(tok), tokenizer=tok, device="cpu", dtype=torch.float32, seed=3
    )
    assert processor.tokenizer.pad_token == "<pad>" and processor.image_token_id == tok.convert_tokens_to_ids(
        "<image>"
    )
    assert video_llm.image_token_count(processor) == 4  # 28 px / patch 14
    frames = video_llm.random_frames(2, size=28)
    inputs = video_llm.prepare_inputs(processor, frames, "What happens?", "A man walks.")
    assert torch.equal(
        inputs["input_ids"],
        video_llm.prepare_inputs(memory_processor, frames, "What happens?", "A man walks.")["input_ids"],
    )
    with torch.no_grad():
        got = model(**inputs).logits
        want = memory.eval()(**inputs).logits
    assert torch.equal(got, want)


# --- the evaluator's image encoder -----------------------------------------------------------------


def test_clip_vision_snapshot_loads_by_path_like_the_model_in_memory(tmp_path, tiny_registry):
    encoder = load_clip_vision(CLIP_L_RANDOM, cache_dir=tmp_path, device="cpu")
    assert (tmp_path / "clip-vit-large-patch14-random-v1" / "model.safetensors").is_file()
    model, processor = snapshots.build_clip_vision(
        config=_tiny_clip(), device="cpu", dtype=torch.float32, seed=5
    )
    frames = video_llm.random_frames(3, size=40)
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            model(pixel_values=processor(images=frames, return_tensors="pt")["pixel_values"]).image_embeds,
            dim=-1,
        )
    assert torch.equal(encoder.embed(frames), want)


# --- the real sizes (shapes only) ------------------------------------------------------------------


def test_real_size_configs_have_the_published_sizes():
    from transformers import CLIPVisionModelWithProjection, LlavaForConditionalGeneration

    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(video_llm.llava_7b_config())
        clip = CLIPVisionModelWithProjection(snapshots.clip_vit_large_config())
    assert 7.0e9 < sum(p.numel() for p in llava.parameters()) < 7.1e9
    assert 3.0e8 < sum(p.numel() for p in clip.parameters()) < 3.1e8
    assert real_sdxl_refiner_unet_config()["cross_attention_dim"] == 1280
    assert set(snapshots.PRESET_SNAPSHOTS["sdxl-random"]) == set(snapshots.SNAPSHOTS)


def test_snapshot_sizes_are_their_weights_bytes():
    """The sizes the disk check forecasts: every saved tensor's bytes, the models built on the meta device
    (the README's table measured 12.1, 13.2 and 0.57 GiB on disk)."""
    from transformers import CLIPVisionModelWithProjection, LlavaForConditionalGeneration

    from dreamframe.models.sdxl_configs import build_random_sdxl

    def saved_bytes(*modules, dtype_bytes=2) -> int:
        return sum(t.numel() * dtype_bytes for m in modules for t in m.state_dict().values())

    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(video_llm.llava_7b_config())
        clip = CLIPVisionModelWithProjection(snapshots.clip_vit_large_config())
    pipes = build_random_sdxl(
        torch.device("meta"),
        torch.float16,
        with_refiner=True,
        configs=real_sdxl_base_configs(),
        tokenizers=clip_bpe.sdxl_tokenizers(),
    )
    sdxl_modules = [
        c
        for pipe in (pipes.base, pipes.refiner)
        for c in pipe.components.values()
        if isinstance(c, torch.nn.Module)
    ]
    counted = {
        snapshots.SDXL_RANDOM: saved_bytes(*sdxl_modules),
        snapshots.LLAVA_7B_RANDOM: saved_bytes(llava),
        snapshots.CLIP_L_RANDOM: saved_bytes(clip),
    }
    for name, spec in snapshots.SNAPSHOTS.items():
        assert spec.size_bytes == pytest.approx(counted[name], rel=0.01), name


def test_a_cache_without_room_for_a_snapshot_fails_before_writing(tmp_path, monkeypatch):
    from collections import namedtuple

    from dreamframe import disk_space
    from dreamframe.errors import ResourceExhausted

    written = []
    spec = dataclasses.replace(snapshots.SNAPSHOTS[snapshots.CLIP_L_RANDOM], write=written.append)
    monkeypatch.setitem(snapshots.SNAPSHOTS, snapshots.CLIP_L_RANDOM, spec)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 300 << 20))
    with pytest.raises(ResourceExhausted) as err:
        snapshots.snapshot_dir(snapshots.CLIP_L_RANDOM, tmp_path)
    assert (
        err.value.field == "models.cache_dir"
        and "writing the clip-vit-large-patch14-random snapshot" in err.value.message
    )
    assert written == [] and list(tmp_path.iterdir()) == []  # no half snapshot, no temp folder


# --- the one-word local preset ---------------------------------------------------------------------


def test_sdxl_random_local_preset_sets_every_service(monkeypatch):
    from dreamframe import config
    from dreamframe.cli.commands import PRESETS
    from dreamframe.models import clip_vision

    env = PRESETS["sdxl-random"]
    for key in [k for k in os.environ if k.startswith("DREAMFRAME_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config.get_settings.cache_clear()
    try:
        s = config.get_settings()
        assert s.style.preset == s.renderer.preset == sdxl.SDXL_RANDOM
        assert s.trainer.preset == s.coordinator.train_base_model == video_llm.LLAVA_7B_RANDOM
        assert s.evaluator.image_encoder == clip_vision.CLIP_L_RANDOM
        assert s.plot.backend == "scripted" and s.plot.model == "scripted"
    finally:
        for key in env:
            monkeypatch.delenv(key, raising=False)
        config.get_settings.cache_clear()
    assert env["HF_HUB_OFFLINE"] == "1"  # nothing to download
    # Every name is one the loaders resolve to a snapshot.
    assert {
        env["DREAMFRAME_RENDERER__PRESET"],
        env["DREAMFRAME_TRAINER__PRESET"],
        env["DREAMFRAME_EVALUATOR__IMAGE_ENCODER"],
    } == set(snapshots.PRESET_SNAPSHOTS["sdxl-random"])


def test_a_snapshot_is_written_once_per_cache(tmp_path, monkeypatch):
    written = []

    def write(directory):
        written.append(directory)
        (directory / "preprocessor_config.json").write_text("{}")

    spec = dataclasses.replace(snapshots.SNAPSHOTS[snapshots.CLIP_L_RANDOM], write=write)
    monkeypatch.setitem(snapshots.SNAPSHOTS, snapshots.CLIP_L_RANDOM, spec)
    first = snapshots.snapshot_dir(snapshots.CLIP_L_RANDOM, tmp_path)
    assert snapshots.snapshot_dir(snapshots.CLIP_L_RANDOM, tmp_path) == first == tmp_path / f"{spec.name}-v1"
    assert len(written) == 1 and written[0] != first  # written beside it, then renamed into place
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_sdxl_fp16_files_load_as_they_are_and_convert_after_the_move(tmp_path, tiny_registry, monkeypatch):
    """fp16 files for a bf16 run are read as fp16 (mapped, no CPU conversion) and converted once on the
    device; the weights come out exactly as a direct bf16 load makes them."""
    from diffusers import StableDiffusionXLPipeline

    configs, refiner = tiny_registry["sdxl"]
    root = tmp_path / "sdxl-fp16"
    snapshots.write_sdxl(
        root, configs=configs, refiner_unet=refiner, device="cpu", dtype=torch.float16, seed=7
    )
    assert sdxl.read_dtype(str(root / "base"), torch.bfloat16) == torch.float16
    assert sdxl.read_dtype(str(root / "base"), torch.float32) == torch.float32  # widening: read as asked
    assert sdxl.read_dtype("stabilityai/stable-diffusion-xl-base-1.0", torch.bfloat16) == torch.bfloat16

    read_as = []
    original = StableDiffusionXLPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        read_as.append(kwargs["dtype"])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(spy))
    paths = {"fp16": str(root)}
    loaded = sdxl.load_sdxl("fp16", model_paths=paths, device="cpu", dtype=torch.bfloat16)
    assert read_as == [torch.float16]
    monkeypatch.undo()
    direct = StableDiffusionXLPipeline.from_pretrained(str(root / "base"), dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(loaded.base, name).state_dict(), getattr(direct, name).state_dict()
        assert all(t.dtype == torch.bfloat16 for t in got.values()), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert loaded.refiner.unet.dtype == torch.bfloat16
