"""Style embedding files: safetensors (diffusers-loadable) and the reference .pt, both ways."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from safetensors.torch import load, save

from dreamframe.errors import InvalidArgument
from dreamframe.models import sdxl
from dreamframe.storage import LocalStore
from services.style_trainer.embedding import (
    PRESET_DIMS,
    StyleEmbedding,
    apply_embedding,
    encoder_dims,
    import_embedding,
    single_token_ids,
)
from services.style_trainer.options import StyleOptions
from services.style_trainer.service import Phase, StyleRequest, StyleTrainer

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


# --- importing an existing embedding (issue 20: the seed's .pt as it is) ---------------------------------


def saved(value, *, legacy: bool = False) -> bytes:
    """torch.save's bytes: the zip archive, or (legacy) the pre-1.6 pickle format."""
    buffer = io.BytesIO()
    torch.save(value, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def test_preset_dims_are_the_tiny_models_text_encoders(tiny_base):
    assert encoder_dims(tiny_base()) == PRESET_DIMS["tiny"]
    assert PRESET_DIMS["sdxl"] == (768, 1280)


def test_import_embedding_reads_every_layout_of_both_formats():
    emb = make_embedding()
    bf16 = {"emb": emb.clip_l.to(torch.bfloat16), "emb2": emb.clip_g.to(torch.bfloat16)}
    cases = {
        "safetensors": emb.to_safetensors(),
        "seed .pt (bf16)": saved(bf16),
        "seed progression list": saved([{"emb": torch.zeros(768), "emb2": torch.zeros(1280)}, bf16]),
        "clip_l/clip_g .pt": saved({"clip_l": emb.clip_l[None], "clip_g": emb.clip_g[None]}),
        "legacy torch.save": saved(bf16, legacy=True),
    }
    for name, data in cases.items():
        got = import_embedding(data, dims=(768, 1280))
        assert got.dims() == (768, 1280), name
        assert torch.allclose(got.clip_l, emb.clip_l, atol=1e-2), name
    assert import_embedding(cases["safetensors"]).token == "Dramatic"  # recorded in the file
    assert import_embedding(cases["seed .pt (bf16)"]).token == ""  # the seed's .pt has none: the story's
    assert import_embedding(cases["seed .pt (bf16)"], token="<noir>").token == "<noir>"


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        (saved({"emb": torch.zeros(768), "emb2": torch.zeros(1280)}), "style_embedding", "need 32 and 48"),
        (saved({"<cat-toy>": torch.zeros(768)}), "style_embedding", "single-encoder"),
        (
            saved({"emb": torch.zeros(32, dtype=torch.int32), "emb2": torch.zeros(48)}),
            "style_embedding.emb",
            "float",
        ),
        (b"\x00" * 64, "style_embedding", "neither a safetensors file nor a torch .pt"),
        (b"PK\x03\x04" + b"\x00" * (4 * 1024 * 1024), "style_embedding", "at most"),
    ],
)
def test_import_embedding_refuses_clearly(data, field, message):
    with pytest.raises(InvalidArgument) as info:
        import_embedding(data, dims=(32, 48))
    assert info.value.field == field and message in info.value.message


def test_import_embedding_checks_the_token():
    data = make_embedding(dims=(32, 48)).to_safetensors()
    with pytest.raises(InvalidArgument) as info:
        import_embedding(data, token="two words")
    assert info.value.field == "style_token"
    bad_recorded = save(
        {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)}, metadata={"token": "a b"}
    )
    with pytest.raises(InvalidArgument) as info:
        import_embedding(bad_recorded)
    assert info.value.field == "style_embedding.token"


def test_style_trainer_imports_without_training_or_loading_a_model(tmp_path):
    store = LocalStore(tmp_path, "dreamframe")
    trainer = StyleTrainer(store, cache_dir=tmp_path / "models")
    ref = store.put_bytes("uploads/seed.pt", saved({"emb": torch.ones(32), "emb2": torch.ones(48)}))
    request = StyleRequest(
        job_id="j", keyword="Dramatic", embedding=ref, options=StyleOptions(preset="tiny"), story_index=2
    )
    (done,) = list(trainer.train(request))
    result = done.result
    assert done.phase == Phase.DONE and result.token == "Dramatic" and result.steps == 0
    assert load(store.get_bytes(result.embedding.key))["clip_l"].shape == (1, 32)
    raw = torch.load(io.BytesIO(store.get_bytes(result.reference_embedding.key)), weights_only=True)
    assert raw["emb2"].shape == (48,)
    assert trainer.loaded_presets == []
    # idempotent: the same file, token and preset reuse the stored result
    (again,) = list(trainer.train(request))
    assert again.result.reused and again.result.embedding == result.embedding
    # an explicit token beats the keyword; SDXL rows do not fit the tiny preset
    (named,) = list(trainer.train(dataclasses.replace(request, token="<smith>")))
    assert named.result.token == "<smith>"
    wide = store.put_bytes("uploads/sdxl.pt", saved({"emb": torch.ones(768), "emb2": torch.ones(1280)}))
    with pytest.raises(InvalidArgument) as info:
        list(trainer.train(dataclasses.replace(request, embedding=wide)))
    assert info.value.field == "embedding" and "preset 'tiny'" in info.value.message
