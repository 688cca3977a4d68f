"""Textual inversion on the tiny SDXL preset: what trains, what must not, and what the result renders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from model_checks import assert_same_conditioning
from PIL import Image
from safetensors.torch import load

from dreamframe.errors import InvalidArgument
from dreamframe.models import sdxl
from services.style_trainer.embedding import StyleEmbedding, apply_embedding, single_token_ids
from services.style_trainer.images import training_pixels
from services.style_trainer.inversion import TextualInversion
from services.style_trainer.options import TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "generate an image in Dramatic style: at a bar, a man is sitting"
FAST = TrainOptions(max_train_steps=6, checkpoint_every=0)


@pytest.fixture(scope="module")
def load_tiny(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "style-models"
    return lambda: sdxl.load_sdxl("tiny", cache_dir=cache, device="cpu", with_refiner=False)


@pytest.fixture(scope="module")
def pipes(load_tiny):
    return load_tiny()


def images(count: int = 3, size: tuple[int, int] = (64, 64), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)) for _ in range(count)]


def render(pipe, prompt: str = PROMPT, seed: int = 20) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    image = pipe(prompt, height=64, width=64, num_inference_steps=4, generator=gen).images[0]
    return np.asarray(image, dtype=np.int16)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    # Bit-identical when both pipelines' weights share alignment; at most a rounding step apart else.
    assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.01


def trained(pipes, keyword: str = "Dramatic", options: TrainOptions = FAST) -> TextualInversion:
    ti = TextualInversion(pipes, keyword, options)
    ti.encode_images(images())
    reports = list(ti.train())
    assert [r.step for r in reports] == list(range(1, options.max_train_steps + 1))
    return ti


def test_only_the_token_rows_change_and_the_shared_pipeline_is_untouched(pipes):
    shared = (pipes.base.text_encoder, pipes.base.text_encoder_2)
    before = [{name: t.detach().clone() for name, t in e.state_dict().items()} for e in shared]
    tables = [encoder.get_input_embeddings().weight.detach().clone() for encoder in shared]
    initial = TextualInversion(pipes, "Dramatic", FAST).rows()  # the same seed: the same start
    ti = trained(pipes)
    assert ti.added and ti.token == "Dramatic"
    rendering = (ti.pipeline.text_encoder, ti.pipeline.text_encoder_2)
    for encoder, own, original, table, token_id, start, row in zip(
        shared, rendering, before, tables, ti.token_ids, initial, ti.rows(), strict=True
    ):
        weight = own.get_input_embeddings().weight.detach()
        assert token_id == table.shape[0] and weight.shape[0] == table.shape[0] + 1  # a new token
        # every other row bit-identical after 6 optimizer steps with weight decay
        assert (weight[:token_id] - table).abs().max().item() == 0
        assert torch.equal(weight[token_id], row)
        assert (row - start).abs().max() > 0, "the token's row learned"
        # nothing of the loaded encoders changed
        assert all(torch.equal(t, original[name]) for name, t in encoder.state_dict().items())
    assert single_token_ids(pipes.base, "Dramatic") is None, "shared tokenizer modified"
    # nothing but the two token rows can learn
    trainable = [p for p in ti.prompt_encoder.parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(a is b for a, b in zip(trainable, ti.prompt_encoder.rows, strict=True))
    assert [p.shape[0] for p in trainable] == [32, 48]
    for module in (pipes.base.unet, *shared):
        assert not any(p.requires_grad for p in module.parameters())


def test_init_rows_are_small_random(pipes):
    ti = TextualInversion(pipes, "Dramatic", FAST)
    row = ti.embedding().clip_g
    assert 0.003 < row.std().item() < 0.03 and row.abs().max().item() < 0.1


def test_losses_are_finite_and_overfitting_lowers_the_loss(pipes):
    options = TrainOptions(
        max_train_steps=30,
        gradient_accumulation_steps=1,
        lr_stages=((1, 5e-2),),
        mirror=False,
        checkpoint_every=0,
    )
    ti = TextualInversion(pipes, "Dramatic", options)
    ti.encode_images(images(2))
    before = ti.evaluate_loss(samples=16)
    losses = [r.loss for r in ti.train()]
    after = ti.evaluate_loss(samples=16)
    assert all(np.isfinite(losses)) and len(losses) == 30
    assert after < before, (before, after)
    assert ti.evaluate_loss(samples=16) == after, "evaluation draws are fixed"


def test_prompt_encoding_matches_the_pipeline(pipes):
    ti = TextualInversion(pipes, "Dramatic", FAST)
    embeds, pooled = ti.encode_prompts(ti.prompt_ids[0][:2], ti.prompt_ids[1][:2])
    ref_embeds, _, ref_pooled, _ = ti.pipeline.encode_prompt(
        ti.prompts[:2], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert torch.equal(embeds, ref_embeds) and torch.equal(pooled, ref_pooled)
    assert ti.prompts[0] == "generate an image in Dramatic painting style"
    assert len(ti.prompts) == 5 * 4


def test_latents_are_cached_with_mirrors_and_crop_time_ids(pipes):
    ti = TextualInversion(pipes, "Dramatic", FAST)
    wide = images(1, size=(96, 64))[0]
    ti.encode_images([wide])
    assert len(ti.latents) == 2  # the image and its mirror image
    plain, mirror = ti.latents
    assert plain.mean.shape == (4, 8, 12)
    assert not torch.equal(plain.mean, mirror.mean)
    # every 64×64 crop along the long side: (orig h, orig w, top, left, target h, target w)
    assert plain.time_ids.shape == (1, 5, 6)
    assert plain.time_ids[0, 3].tolist() == [64, 96, 0, 24, 64, 64]
    # the VAE's scaling factor is applied to the cached distribution
    square = images(1, seed=5)[0]
    with torch.no_grad():
        direct = ti.pipeline.vae.encode(training_pixels(square, 64)[None]).latent_dist
    ti.encode_images([square])
    factor = ti.pipeline.vae.config.scaling_factor
    assert factor != 1
    torch.testing.assert_close(ti.latents[0].mean, direct.mean[0] * factor)
    torch.testing.assert_close(ti.latents[0].std, direct.std[0] * factor)


def test_fresh_pipeline_with_the_saved_embedding_renders_like_the_trained_one(pipes, load_tiny):
    ti = trained(pipes)
    tensors = load(ti.embedding().to_safetensors())
    fresh = load_tiny().base
    plain = render(fresh)
    fresh.load_textual_inversion(
        tensors["clip_l"], token="Dramatic", text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer
    )
    fresh.load_textual_inversion(
        tensors["clip_g"], token="Dramatic", text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2
    )
    assert_same_conditioning(fresh, ti.pipeline, PROMPT)
    with_embedding = render(fresh)
    assert_same_image(with_embedding, render(ti.pipeline))
    assert np.abs(with_embedding - plain).mean() > 0.5, "the embedding changes the image for the same seed"


def test_a_single_token_keyword_trains_its_own_row(pipes, load_tiny):
    # "x" is one token in the byte vocabulary: its own row is trained, as the reference does
    ti = trained(pipes, keyword="x")
    assert not ti.added
    assert ti.token_ids == single_token_ids(pipes.base, "x")
    assert (
        ti.pipeline.text_encoder.get_input_embeddings().weight.shape
        == pipes.base.text_encoder.get_input_embeddings().weight.shape
    )
    fresh = load_tiny().base
    apply_embedding(
        fresh, StyleEmbedding.from_reference_pt(ti.embedding().to_reference_pt(), "x", dims=(32, 48))
    )
    prompt = "generate an image in x style: a bar"
    assert_same_conditioning(fresh, ti.pipeline, prompt)
    assert_same_image(render(fresh, prompt), render(ti.pipeline, prompt))


def assert_same_embedding(a: TextualInversion, b: TextualInversion, atol: float = 1e-5) -> None:
    for x, y in zip(a.rows(), b.rows(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def stopped_after_two_steps(pipes, options: TrainOptions) -> TextualInversion:
    """A training asked to stop after its second step (it finishes that step first)."""
    ti = TextualInversion(pipes, "Dramatic", options)
    ti.encode_images(images())
    stop_after = iter([False, True])
    assert [r.step for r in ti.train(should_stop=lambda: next(stop_after))] == [1, 2]
    return ti


def test_resumed_training_matches_uninterrupted_training(pipes):
    options = dataclasses.replace(FAST, max_train_steps=5)
    full = trained(pipes, options=options)

    first = stopped_after_two_steps(pipes, options)
    state = first.state()

    resumed = TextualInversion(pipes, "Dramatic", options)
    resumed.encode_images(images())
    resumed.load_state(state)
    reports = list(resumed.train())
    assert [r.step for r in reports] == [3, 4, 5] and reports[-1].passes_computed == 3 * 2
    assert_same_embedding(full, resumed, atol=1e-6)
    assert full.state().adam_step == resumed.state().adam_step == 5


def test_empty_keyword_and_no_images(pipes):
    with pytest.raises(InvalidArgument) as info:
        TextualInversion(pipes, "  ", FAST)
    assert info.value.field == "style_keyword"
    with pytest.raises(InvalidArgument) as info:
        list(TextualInversion(pipes, "Dramatic", FAST).train())
    assert info.value.field == "style_images"


def test_batched_accumulation_gives_the_same_embedding_as_pass_by_pass(pipes):
    # The same samples (each pass draws from its own seed) in one forward: the same gradient up to rounding.
    four_steps = dataclasses.replace(FAST, max_train_steps=4)
    sequential = trained(pipes, options=dataclasses.replace(four_steps, batch_accumulation=False))
    batched = trained(pipes, options=dataclasses.replace(four_steps, batch_accumulation=True))
    assert_same_embedding(sequential, batched, atol=1e-5)
    assert not any(torch.equal(row, torch.zeros_like(row)) for row in sequential.rows())
    # and the reported loss is the same mean over the step's samples
    assert sequential.last_loss == pytest.approx(batched.last_loss, rel=1e-4)


def test_trainings_in_one_process_keep_their_own_rows(pipes):
    # They share one prompt encoder (compiled once per process); each binds its rows in when it runs.
    options = dataclasses.replace(FAST, max_train_steps=4)
    solo = trained(pipes, options=options)
    first = stopped_after_two_steps(pipes, options)
    other = trained(pipes, keyword="x", options=dataclasses.replace(options, seed=7))
    other_rows = other.rows()
    assert [r.step for r in first.train()] == [3, 4]
    for x, y in zip(first.rows(), solo.rows(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(other.rows(), other_rows, strict=True):
        assert torch.equal(x, y) and not torch.equal(x, first.rows()[0][: x.shape[0]])


def test_losses_read_in_bunches_are_the_same_losses(pipes):
    options = dataclasses.replace(FAST, max_train_steps=7)

    def run(**change) -> list[tuple[int, int, float]]:
        ti = TextualInversion(pipes, "Dramatic", dataclasses.replace(options, **change))
        ti.encode_images(images())
        return [(r.step, ti.step, r.loss) for r in ti.train()]

    each = run(loss_read_every=1)
    assert [(step, at) for step, at, _ in each] == [(s, s) for s in range(1, 8)]
    bunched = run(loss_read_every=4)
    # read when four are waiting, and at the end (CPU: no lag)
    assert [at for _, at, _ in bunched] == [4, 4, 4, 4, 7, 7, 7]
    assert [loss for *_, loss in bunched] == [loss for *_, loss in each]
    # a checkpoint step is always reported while the trainer is at it
    at_checkpoints = run(loss_read_every=4, checkpoint_every=3)
    assert [at for _, at, _ in at_checkpoints] == [3, 3, 3, 6, 6, 6, 7]


def test_channels_last_and_math_attention_train_the_same_embedding(pipes):
    options = dataclasses.replace(FAST, max_train_steps=4)
    plain = trained(pipes, options=options)
    fast = trained(pipes, options=dataclasses.replace(options, channels_last=True, attention_backend="math"))
    assert pipes.base.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_embedding(plain, fast)
    trained(pipes, options=options)  # the default turns the layout back
    assert pipes.base.unet.conv_in.weight.is_contiguous()


@pytest.mark.slow
def test_compiled_training_matches_eager_without_graph_breaks(load_tiny, monkeypatch):
    from services.style_trainer import inversion

    pipes = load_tiny()  # its own modules: the compiled ones stay with them
    # The real compile's tracing (no graph break in either module: CUDA graphs cover each whole), with
    # the eager backend (inductor's CPU code generation would take minutes here).
    monkeypatch.setattr(
        inversion, "_compile", lambda module, mode: torch.compile(module, backend="aot_eager", fullgraph=True)
    )
    options = dataclasses.replace(FAST, max_train_steps=3)
    eager = trained(pipes, options=options)
    text_only = trained(pipes, options=dataclasses.replace(options, compile_text_encoders=True))
    assert text_only._compiled_prompts is not None and text_only._compiled_unet is None
    both = trained(pipes, options=dataclasses.replace(options, compile=True))
    assert both._compiled_prompts is not None and both._compiled_unet is not None
    unet_only = trained(
        pipes, options=dataclasses.replace(options, compile=True, compile_text_encoders=False)
    )
    assert unet_only._compiled_prompts is None
    for other in (text_only, both, unet_only):
        assert_same_embedding(eager, other)
