"""The seed project's own files, as they are (issue 20): its reference-format story and its style
embedding `.pt` (DreamFrame-code json/story_info_0.json, Embeddings/story_0_Dramatic.pt: a dict
{"emb": [768], "emb2": [1280]} saved by StyleImmobilization/style_embedding.py's save_XLembedding, bf16 rows).

- `dreamframe import-style`: a good .pt converted to safetensors and uploaded; wrong dims, a pickle that is
  not tensors (never run), a single-encoder file: clear errors, nothing uploaded.
- SubmitJob: the style fields checked on their own; a reference story without a style source for the
  style stage is INVALID_ARGUMENT naming spec.stories.N and the choices.
- End to end over real local services (coordinator, style-trainer, keyframe-renderer; tiny preset, local
  store): `dreamframe submit --story <seed-format story> --stages style,render --style-embedding <.pt>`
  renders every frame with the imported embedding, no training.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image
from safetensors.torch import load
from typer.testing import CliRunner

from dreamframe import keys
from dreamframe.cli import commands as cli
from dreamframe.cli import local
from dreamframe.config import ClientSettings, get_settings
from dreamframe.errors import InvalidArgument
from dreamframe.serving import error_detail_from, make_sync_channel
from dreamframe.storage import LocalStore
from dreamframe.story import load_story
from dreamframe.v1 import common_pb2, coordinator_pb2_grpc
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator.spec import check_style_source, selected_stages, validate_submission

runner = CliRunner()
TINY_DIMS = (32, 48)  # the tiny preset's CLIP-L / CLIP-bigG widths


def seed_story(frames: int = 3) -> dict:
    """A story file in the seed's format: frames "generate an image in Dramatic style: ...", dialogues
    between them, QA; no style description anywhere (the format has no field for one)."""
    img_diag = []
    for i in range(frames):
        img_diag.append(
            [
                "frame",
                "generate an image in Dramatic style: In the blacksmith's shop, a man looks like Gerard "
                f"Butler in brown is standing at his workbench, moment {i}.",
            ]
        )
        img_diag.append(["dialogue", f"This is piece {i}... It must be perfect."])
    return {
        "character": {"Darius": "a man looks like Gerard Butler in brown"},
        "img_diag": img_diag,
        "overview": "A blacksmith mends a shield before the war.",
        "QA": [{"Question": "Where does Darius work?", "Answer": "In the blacksmith's shop."}],
    }


def seed_pt(dims=TINY_DIMS, *, seed: int = 3) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A .pt as the seed writes it: torch.save of {"emb", "emb2"}, rows in bf16 (its training dtype)."""
    g = torch.Generator().manual_seed(seed)
    value = {
        "emb": torch.randn(dims[0], generator=g).to(torch.bfloat16),
        "emb2": torch.randn(dims[1], generator=g).to(torch.bfloat16),
    }
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue(), value


class RunsCode:
    """A pickle that would create ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMFRAME_STORAGE__BACKEND", "local")
    monkeypatch.setenv("DREAMFRAME_STORAGE__ROOT", str(tmp_path / "store"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def uploaded_styles(root: Path) -> list[Path]:
    return sorted((root / "store" / "dreamframe" / "uploads" / "styles").glob("*"))


# --- dreamframe import-style ------------------------------------------------------------------------


def test_import_style_converts_the_seed_pt_to_safetensors(local_store):
    data, rows = seed_pt()
    path = local_store / "story_0_Dramatic.pt"
    path.write_bytes(data)
    result = runner.invoke(cli.app, ["import-style", str(path), "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    assert "clip_l 32 + clip_g 48" in result.output and "no token" in result.output
    ref = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    (stored,) = uploaded_styles(local_store)
    assert ref["key"] == f"uploads/styles/{stored.name}" and int(ref["size"]) == stored.stat().st_size
    tensors = load(stored.read_bytes())
    assert tensors["clip_l"].shape == (1, 32) and tensors["clip_g"].shape == (1, 48)
    assert torch.equal(tensors["clip_l"][0], rows["emb"].float())
    assert torch.equal(tensors["clip_g"][0], rows["emb2"].float())
    # with a token, it is recorded in the file
    result = runner.invoke(cli.app, ["import-style", str(path), "--preset", "tiny", "--token", "Dramatic"])
    assert result.exit_code == 0, result.output
    assert "token 'Dramatic'" in result.output


def test_import_style_refuses_rows_that_do_not_fit_the_model(local_store):
    path = local_store / "sdxl.pt"
    path.write_bytes(seed_pt(dims=(768, 1280))[0])
    result = runner.invoke(cli.app, ["import-style", str(path), "--preset", "tiny"])
    assert result.exit_code == 2
    assert "768 and 1280" in result.output and "32 and 48" in result.output
    assert uploaded_styles(local_store) == []
    # the same file fits SDXL, the default preset
    result = runner.invoke(cli.app, ["import-style", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("layout", ["torch.save", "pickle"])
def test_import_style_never_runs_a_pickle_that_is_not_tensors(local_store, layout):
    marker = local_store / "ran"
    path = local_store / "evil.pt"
    if layout == "torch.save":  # the zip archive torch.save writes
        buffer = io.BytesIO()
        torch.save({"emb": RunsCode(marker), "emb2": torch.zeros(48)}, buffer)
        path.write_bytes(buffer.getvalue())
    else:  # the legacy format: a bare pickle
        path.write_bytes(pickle.dumps({"emb": RunsCode(marker)}, protocol=2))
    result = runner.invoke(cli.app, ["import-style", str(path), "--preset", "tiny"])
    assert result.exit_code == 2
    assert "not a readable torch file of tensors" in result.output
    assert not marker.exists(), "the pickle ran"
    assert uploaded_styles(local_store) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"<dramatic>": torch.zeros(32)}, "single-encoder"),
        ({"emb": "not a tensor", "emb2": torch.zeros(48)}, "missing tensor"),
        ({"emb": torch.zeros(32, dtype=torch.int64), "emb2": torch.zeros(48)}, "floating-point"),
    ],
)
def test_import_style_names_what_is_wrong_with_the_file(local_store, value, message):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    path = local_store / "odd.pt"
    path.write_bytes(buffer.getvalue())
    result = runner.invoke(cli.app, ["import-style", str(path), "--preset", "tiny"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert uploaded_styles(local_store) == []


# --- SubmitJob: the style fields and the style source -----------------------------------------------


def story_file(**style) -> pb.StoryInput:
    return pb.StoryInput(story=common_pb2.ObjectRef(key="uploads/story.json"), **style)


def refused(spec: pb.JobSpec) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate_submission(pb.SubmitJobRequest(spec=spec))
    return info.value


def test_style_fields_are_checked_on_their_own():
    style = [pb.STAGE_STYLE, pb.STAGE_RENDER]
    embedding = common_pb2.ObjectRef(key="uploads/styles/x.safetensors")
    both = story_file(style_description="moody oil painting", style_embedding=embedding)
    error = refused(pb.JobSpec(stories=[both], stages=style))
    assert error.field == "spec.stories.0" and "at most one" in error.message
    # without the style stage a style source would be ignored: refused, naming it
    error = refused(pb.JobSpec(stories=[story_file(style_embedding=embedding)], stages=[pb.STAGE_RENDER]))
    assert error.field == "spec.stories.0.style_embedding" and "add style to spec.stages" in error.message
    bad_ref = story_file(style_images=[common_pb2.ObjectRef(key="../etc/passwd")])
    assert refused(pb.JobSpec(stories=[bad_ref], stages=style)).field == "spec.stories.0.style_images.0.key"
    blank = story_file(style_description="   ")
    assert refused(pb.JobSpec(stories=[blank], stages=style)).field == "spec.stories.0.style_description"
    two_words = story_file(style_embedding=embedding, style_token="two words")
    assert refused(pb.JobSpec(stories=[two_words], stages=style)).field == "spec.stories.0.style_token"
    validate_submission(pb.SubmitJobRequest(spec=pb.JobSpec(stories=[story_file(style_embedding=embedding)])))


def test_a_reference_story_without_a_style_source_names_the_story_and_the_choices():
    story = load_story(json.dumps(seed_story()))
    assert story.style_keyword == "Dramatic" and not story.style_description
    spec = pb.JobSpec(stories=[story_file()], stages=[pb.STAGE_STYLE, pb.STAGE_RENDER])
    with pytest.raises(InvalidArgument) as info:
        check_style_source(spec.stories[0], story, selected_stages(spec), "spec.stories.0")
    assert info.value.field == "spec.stories.0"
    for choice in ("style_description", "style_images", "style_embedding", "--style-embedding"):
        assert choice in info.value.message
    # any one source is enough; without the style stage none is needed
    for given in (
        story_file(style_description="dark oil painting, dramatic light"),
        story_file(style_images=[common_pb2.ObjectRef(key="uploads/a.png")]),
        story_file(style_embedding=common_pb2.ObjectRef(key="uploads/styles/x.safetensors")),
    ):
        check_style_source(given, story, selected_stages(spec), "spec.stories.0")
    check_style_source(story_file(), story, [pb.STAGE_PLOT, pb.STAGE_RENDER], "spec.stories.0")
    # training needs a token: the story's keyword, else style_token
    no_keyword = story.model_copy(update={"style_keyword": ""})
    with pytest.raises(InvalidArgument) as info:
        check_style_source(
            story_file(style_description="noir"), no_keyword, [pb.STAGE_STYLE], "spec.stories.0"
        )
    assert info.value.field == "spec.stories.0.style_token"


# --- end to end: the seed's story and .pt through the CLI over real local services ---------------------


@dataclass
class Stack:
    tmp: Path
    port: int
    store: LocalStore

    def invoke(self, *args: str):
        get_settings.cache_clear()
        result = runner.invoke(cli.app, list(args))
        get_settings.cache_clear()
        return result

    @property
    def coordinator(self) -> coordinator_pb2_grpc.CoordinatorServiceStub:
        channel = make_sync_channel(f"{local.HOST}:{self.port}", ClientSettings(deadline_seconds=30))
        return coordinator_pb2_grpc.CoordinatorServiceStub(channel)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Only what `style,render` calls: the coordinator, style-trainer (imports, loads no model) and one
    keyframe-renderer, tiny preset, one local store."""
    tmp = tmp_path_factory.mktemp("seed")
    env = {
        "DREAMFRAME_STORAGE__BACKEND": "local",
        "DREAMFRAME_STORAGE__ROOT": str(tmp / "store"),
        "DREAMFRAME_MODELS__CACHE_DIR": str(tmp / "models"),
        "DREAMFRAME_STYLE__PRESET": "tiny",
        "DREAMFRAME_STYLE__PRELOAD": "false",
        "DREAMFRAME_RENDERER__PRESET": "tiny",
        "DREAMFRAME_COORDINATOR__PERSIST_INTERVAL_SECONDS": "0.2",
        "DREAMFRAME_SERVER__GRACE_SECONDS": "5",
        "HF_HUB_OFFLINE": "1",
    }
    base_port = random.randrange(21000, 40000, 100)
    plan, addresses = local.service_plan(base_port=base_port)
    wanted = ("coordinator", "style-trainer", "keyframe-renderer")
    (tmp / "logs").mkdir()
    processes = [
        local.spawn(p, {**env, **addresses}, tmp / "logs" / f"{p.name}.log") for p in plan if p.name in wanted
    ]
    patch = pytest.MonkeyPatch()
    for name, value in env.items():
        patch.setenv(name, value)
    patch.setenv("DREAMFRAME_CLI__COORDINATOR_ADDRESS", f"{local.HOST}:{base_port}")
    try:
        local.wait_healthy(processes, timeout=600)
        yield Stack(tmp, base_port, LocalStore(tmp / "store", "dreamframe"))
    finally:
        local.stop_processes(processes, grace=10)
        patch.undo()
        get_settings.cache_clear()


@pytest.mark.slow
def test_seed_story_and_pt_render_through_submit(stack):
    story = stack.tmp / "story_info_0.json"
    story.write_text(json.dumps(seed_story(frames=3), indent=4))
    data, rows = seed_pt()
    pt = stack.tmp / "story_0_Dramatic.pt"
    pt.write_bytes(data)
    spec = stack.tmp / "spec.json"
    spec.write_text(json.dumps({"render": {"steps": 2, "batch_size": 4}}))
    result = stack.invoke(
        "submit", "--story", str(story), "--stages", "style,render", "--style-embedding", str(pt),
        "--spec", str(spec), "--job-id", "seed-pt", "--watch",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "job seed-pt: succeeded" in result.output

    job = stack.coordinator.GetJob(pb.GetJobRequest(job_id="seed-pt")).job
    assert job.state == pb.JOB_STATE_SUCCEEDED
    style = json.loads(stack.store.get_bytes(f"{keys.style_prefix('seed-pt', 0)}style.json"))
    assert style["token"] == "Dramatic"  # the story's keyword, as the seed's generate.py --keyword
    embedding = stack.store.get_bytes(style["embedding"]["key"])
    tensors = load(embedding)
    assert torch.equal(tensors["clip_l"][0], rows["emb"].float())
    assert torch.equal(tensors["clip_g"][0], rows["emb2"].float())
    # imported, not trained: no style images, no checkpoint
    result_json = stack.store.get_json(f"{keys.style_prefix('seed-pt', 0)}result.json")
    assert result_json["steps"] == 0 and result_json["style_images"] == []

    listing = json.loads(stack.store.get_bytes(f"{keys.story_prefix('seed-pt', 0)}frames.json"))
    assert len(listing["frames"]) == 3
    for ref in listing["frames"]:
        png = Image.open(io.BytesIO(stack.store.get_bytes(ref["key"])))
        recipe = json.loads(png.text["dreamframe"])
        assert recipe["style"]["token"] == "Dramatic"
        assert recipe["style"]["embedding_sha256"] == style["embedding"]["sha256"]
        assert png.text["prompt"].startswith("generate an image in Dramatic style:")


@pytest.mark.slow
def test_submit_without_a_style_source_is_refused_naming_the_story(stack):
    story = stack.tmp / "no_style.json"
    story.write_text(json.dumps(seed_story(frames=1)))
    result = stack.invoke("submit", "--story", str(story), "--stages", "style,render")
    assert result.exit_code == 2
    assert "INVALID_ARGUMENT" in result.output and "spec.stories.0" in result.output
    assert "--style-description" in result.output and "--style-embedding" in result.output
    # over gRPC: the field in the status details
    ref = stack.store.put_bytes("uploads/no-style.json", story.read_bytes())
    spec = pb.JobSpec(stages=[pb.STAGE_STYLE, pb.STAGE_RENDER])
    spec.stories.add(story=common_pb2.ObjectRef(bucket=ref.bucket, key=ref.key))
    with pytest.raises(grpc.RpcError) as info:
        stack.coordinator.SubmitJob(pb.SubmitJobRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail_from(info.value).field == "spec.stories.0"


@pytest.mark.slow
def test_a_raw_pt_of_another_model_fails_the_style_stage_clearly(stack):
    """An RPC caller may name a .pt in storage as it is: style-trainer converts and checks it (here: SDXL's
    widths against the tiny preset), and the job fails naming the story's style_embedding."""
    story = stack.store.put_bytes("uploads/seed.json", json.dumps(seed_story(frames=1)).encode())
    pt = stack.store.put_bytes("uploads/sdxl.pt", seed_pt(dims=(768, 1280))[0])
    spec = pb.JobSpec(stages=[pb.STAGE_STYLE, pb.STAGE_RENDER])
    spec.stories.add(
        story=common_pb2.ObjectRef(bucket=story.bucket, key=story.key),
        style_embedding=common_pb2.ObjectRef(bucket=pt.bucket, key=pt.key),
    )
    stack.coordinator.SubmitJob(pb.SubmitJobRequest(spec=spec, job_id="seed-wrong-dims"))
    result = stack.invoke("watch", "seed-wrong-dims")
    job = stack.coordinator.GetJob(pb.GetJobRequest(job_id="seed-wrong-dims")).job
    assert job.state == pb.JOB_STATE_FAILED, result.output
    assert "spec.stories.0.style_embedding" in job.error and "32 and 48" in job.error


def test_submit_flags_put_each_style_on_its_story(local_store):
    story = local_store / "story.json"
    story.write_text(json.dumps(seed_story(frames=1)))
    images = local_store / "style"
    images.mkdir()
    for name in ("Battleground0.jpg", "Cathedral1.PNG", "notes.txt"):
        (images / name).write_bytes(name.encode())
    pt = local_store / "emb.pt"
    pt.write_bytes(seed_pt()[0])
    settings = get_settings()
    style = {
        "description": ["0:dark oil painting"],
        "image": [f"1:{images}"],
        "embedding": [],
        "token": ["1:<smith>"],
    }
    spec = cli._build_spec(settings, ["a theme"], [story], "plot,style,render", None, None, style)
    assert spec.stories[0].style_description == "dark oil painting"
    assert [ref.key.rsplit(".", 1)[1] for ref in spec.stories[1].style_images] == ["jpg", "png"]
    assert spec.stories[1].style_token == "<smith>"
    # one story: no prefix needed; several: the prefix is required
    one = cli._build_spec(settings, [], [story], "style,render", None, None, {"embedding": [str(pt)]})
    assert one.stories[0].style_embedding.key.startswith("uploads/styles/")
    with pytest.raises(InvalidArgument) as info:
        cli._build_spec(settings, ["a", "b"], [], None, None, None, {"description": ["noir"]})
    assert info.value.field == "--style-description" and "N:VALUE" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        cli._build_spec(settings, ["a"], [], None, None, None, {"description": ["3:noir"]})
    assert "no story 3" in info.value.message
