"""Style embedding files: safetensors (diffusers-loadable) and the reference .pt, both ways."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load, save

from dreamframe.errors import InvalidArgument
from dreamframe.models import sdxl
from services.style_trainer.embedding import StyleEmbedding, apply_embedding, single_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def make_embedding(dims=(768, 1280), token="Dramatic") -> StyleEmbedding:
    g = torch.Generator().manual_seed(7)
    return StyleEmbedding(token, torch.randn(dims[0], generator=g), torch.randn(dims[1], generator=g))


def test_safetensors_round_trip_and_layout():
    emb = make_embedding()
    data = emb.to_safetensors()
    tensors = load(data)
    assert tensors["clip_l"].shape == (1, 768) and tensors["clip_g"].shape == (1, 1280)
    back = StyleEmbedding.from_safetensors(data, dims=(768, 1280))
    assert back.token == "Dramatic"
    assert torch.equal(back.clip_l, emb.clip_l) and torch.equal(back.clip_g, emb.clip_g)


def test_reference_pt_round_trip():
    emb = make_embedding()
    data = emb.to_reference_pt()
    raw = torch.load(io.BytesIO(data), weights_only=True)
    assert set(raw) == {"emb", "emb2"} and raw["emb"].shape == (768,) and raw["emb2"].shape == (1280,)
    back = StyleEmbedding.from_reference_pt(data, "Dramatic")
    assert torch.equal(back.clip_l, emb.clip_l) and torch.equal(back.clip_g, emb.clip_g)
    # the reference also saves the progression (a list of such dicts): the last one is the result
    buffer = io.BytesIO()
    torch.save([{"emb": torch.zeros(768), "emb2": torch.zeros(1280)}, raw], buffer)
    assert torch.equal(StyleEmbedding.from_reference_pt(buffer.getvalue(), "Dramatic").clip_g, emb.clip_g)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"emb": torch.zeros(768), "emb2": torch.zeros(768)}, "reference_embedding.emb2"),
        ({"emb": torch.zeros(2, 768), "emb2": torch.zeros(1280)}, "reference_embedding.emb"),
        ({"emb2": torch.zeros(1280)}, "reference_embedding.emb"),
        ({"emb": torch.full((768,), float("nan")), "emb2": torch.zeros(1280)}, "reference_embedding.emb"),
        ([1, 2, 3], "reference_embedding"),
    ],
)
def test_reference_pt_import_names_the_bad_key(value, field):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    with pytest.raises(InvalidArgument) as info:
        StyleEmbedding.from_reference_pt(buffer.getvalue(), "Dramatic")
    assert info.value.field == field


def test_garbage_is_rejected():
    with pytest.raises(InvalidArgument) as info:
        StyleEmbedding.from_reference_pt(b"not a torch file", "x")
    assert info.value.field == "reference_embedding"
    with pytest.raises(InvalidArgument) as info:
        StyleEmbedding.from_safetensors(b"garbage", dims=(768, 1280))
    assert info.value.field == "embedding"
    no_token = save({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    with pytest.raises(InvalidArgument) as info:
        StyleEmbedding.from_safetensors(no_token, dims=(768, 1280))
    assert info.value.field == "embedding.token"
    assert StyleEmbedding.from_safetensors(no_token, token="Noir").token == "Noir"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "style-models"
    return lambda: sdxl.load_sdxl("tiny", cache_dir=cache, device="cpu", with_refiner=False).base


def test_diffusers_load_textual_inversion_takes_the_safetensors(tiny_base):
    pipe = tiny_base()
    emb = make_embedding(dims=(32, 48))
    tensors = load(emb.to_safetensors())
    pipe.load_textual_inversion(
        tensors["clip_l"], token=emb.token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        tensors["clip_g"], token=emb.token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    ids = single_token_ids(pipe, emb.token)
    assert ids is not None
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids[0]], emb.clip_l)
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids[1]], emb.clip_g)


def test_apply_embedding_overwrites_a_vocabulary_token_in_place(tiny_base):
    pipe = tiny_base()
    emb = make_embedding(dims=(32, 48), token="x")  # one token in the byte vocabulary
    ids = single_token_ids(pipe, "x")
    rows_before = len(pipe.tokenizer)
    apply_embedding(pipe, emb)
    assert len(pipe.tokenizer) == rows_before, "no token added"
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids[0]], emb.clip_l)
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids[1]], emb.clip_g)
    with pytest.raises(InvalidArgument) as info:
        apply_embedding(pipe, make_embedding(dims=(768, 1280)))
    assert info.value.field == "embedding"
