"""End to end: a tiny random LLaVA checkpoint and a scripted OpenAI-protocol vision endpoint answer every
benchmark format; the same local server judges (with malformed judgments); one report compares them;
the answer cache makes a re-run and a new judge cheap; bad input is reported or rejected."""

from __future__ import annotations

import pytest
from test_eval_support import (
    BLUE,
    RED,
    FakeOpenAI,
    make_store,
    write_dreamframe_mc,
    write_mvbench,
    write_story_frames,
    write_tempcompass,
    write_videobench,
    write_videochatgpt,
)

from dreamframe.errors import Cancelled, InvalidArgument
from dreamframe.progress import Progress
from services.evaluator.evaluate import Evaluator
from services.evaluator.request import BenchmarkSpec, EndpointSpec, EvaluateRequest, EvaluateResult, ModelSpec
from services.evaluator.settings import EndpointEntry, EvaluatorSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path)


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


def evaluator(store, tmp_path, model_cache, fake=None, **overrides) -> Evaluator:
    if fake is not None:  # the scripted server as the configured endpoint and judge "fake"
        overrides["endpoints"] = {
            "fake": EndpointEntry(base_url=fake.base_url, model="vision"),
            "down": EndpointEntry(base_url="http://127.0.0.1:9/v1", model="vision"),
        }
        overrides["judges"] = {
            "fake": EndpointEntry(base_url=fake.base_url, model="judge", models=["j", "j1", "j2"])
        }
    settings = EvaluatorSettings(work_dir=tmp_path / "work", num_frames=4, max_new_tokens=6, **overrides)
    return Evaluator(store, settings, model_cache_dir=model_cache)


def run(ev: Evaluator, request: EvaluateRequest, **kwargs) -> tuple[EvaluateResult, list[Progress]]:
    progress, result = [], None
    for message in ev.evaluate(request, **kwargs):
        if isinstance(message, EvaluateResult):
            result = message
        else:
            progress.append(message)
    assert result is not None
    return result, progress


def all_benchmarks(store) -> tuple[BenchmarkSpec, ...]:
    red = write_story_frames(store, "jobs/j/stories/000/frames/", RED, seed=1)
    blue = write_story_frames(store, "jobs/j/stories/001/frames/", BLUE, seed=2)
    return (
        BenchmarkSpec("mvbench", data_prefix=write_mvbench(store)["data_prefix"]),
        BenchmarkSpec("tempcompass", data_prefix=write_tempcompass(store)["data_prefix"]),
        BenchmarkSpec("video_bench", data_prefix=write_videobench(store)["data_prefix"]),
        BenchmarkSpec("video_chatgpt", data_prefix=write_videochatgpt(store)["data_prefix"]),
        BenchmarkSpec("dreamframe_mc", name="ours", data_prefix=write_dreamframe_mc(store)["data_prefix"]),
        BenchmarkSpec("style_consistency", name="style", frame_prefixes=(red, blue)),
    )


def rows(report: dict, benchmark: str, model: str) -> dict[str, dict]:
    bench = next(b for b in report["benchmarks"] if b["name"] == benchmark)
    return {r["task"]: r for r in bench["scores"][model]}


def test_two_models_every_format_one_report(store, tmp_path, model_cache, fake) -> None:
    request = EvaluateRequest(
        report_name="compare",
        job_id="job-1",
        models=(
            ModelSpec(name="tiny", preset="tiny"),
            ModelSpec(name="api", endpoint=EndpointSpec(name="fake"), num_frames=3),
        ),
        benchmarks=all_benchmarks(store),
        judge=EndpointSpec(name="fake"),
    )
    result, progress = run(evaluator(store, tmp_path, model_cache, fake), request)
    report = result.report

    # Progress streamed item by item up to the total (19 items x 2 models + 2 stories).
    counted = [p for p in progress if p.total]
    assert counted[-1].done == counted[-1].total == 19 * 2 + 2
    assert [p.done for p in counted] == sorted(p.done for p in counted)
    assert any("api · mvbench · action_sequence/1" in p.current_item for p in progress)

    # The report files, atomically written under reports/<name>/.
    assert {result.report_json.key, result.report_markdown.key, result.items_jsonl.key} == {
        "reports/compare/report.json",
        "reports/compare/report.md",
        "reports/compare/items.jsonl",
    }
    assert store.get_json("reports/compare/report.json") == report
    assert store.verify(result.report_markdown)

    # The endpoint sees the colours: it is right everywhere the answer is the colour.
    for benchmark, task in [
        ("mvbench", "overall"),
        ("tempcompass", "overall"),
        ("video_bench", "overall"),
        ("ours", "overall"),
    ]:
        assert rows(report, benchmark, "api")[task]["score"] == 100.0, benchmark
    mv = rows(report, "mvbench", "api")
    assert (
        mv["Action Sequence"]["items"] == 3 and mv["Moving Direction"]["items"] == 1
    )  # start/end items right too
    assert len(fake.vision_requests()) == 19 + 1  # one consistency item asks two questions
    assert all(
        sum(p["type"] == "image_url" for p in r["messages"][0]["content"]) == 3
        for r in fake.vision_requests()
    )

    # Video-Bench: outputs like "I think it is blue." went to the judge, which mapped them to a letter.
    vb = next(b for b in report["benchmarks"] if b["name"] == "video_bench")
    assert vb["judge_calls"]["api"] == 3
    assert rows(report, "video_bench", "api")["level/Video-Exclusive Understanding"]["score"] == 100.0

    # Video-ChatGPT: a flaky judgment was retried; a broken one is a counted failure for each model.
    for model in ("tiny", "api"):
        vc = rows(report, "video_chatgpt", model)
        assert vc["temporal_understanding"]["score"] is None and vc["temporal_understanding"]["failures"] == 1
        assert vc["correctness"]["items"] == 2 and vc["correctness"]["failures"] == 0
        assert vc["mean"]["failures"] == 1
    assert rows(report, "video_chatgpt", "api")["correctness"]["score"] == 3.0  # red → 4, blue → 2

    # Side by side, with differences against the first model.
    mv_cmp = next(b for b in report["benchmarks"] if b["name"] == "mvbench")["comparison"]
    overall = next(r for r in mv_cmp if r["task"] == "overall")
    assert overall["delta"]["api"] == pytest.approx(overall["scores"]["api"] - overall["scores"]["tiny"])
    markdown = store.get_bytes("reports/compare/report.md").decode()
    assert "| task | tiny | api | Δ api | items | failures |" in markdown
    assert "Differences (Δ) are against the baseline, **tiny**." in markdown
    assert "`action_sequence/3`: video 'missing.mp4' not found" in markdown

    # Bad items are listed, not fatal.
    mvb = next(b for b in report["benchmarks"] if b["name"] == "mvbench")
    assert {e["item_id"] for e in mvb["load_errors"]} == {
        "action_sequence/3",
        "moving_direction/1",
        "moving_direction/2",
    }

    # Style consistency: two palettes are more alike within a story than across.
    style = rows(report, "style", "")
    assert style["within_story"]["score"] > style["across_stories"]["score"]
    assert style["gap"]["score"] == pytest.approx(
        style["within_story"]["score"] - style["across_stories"]["score"]
    )

    # Flat scores for the RPC, and per-item lines.
    assert any(s.model == "api" and s.benchmark == "mvbench" and s.task == "overall" for s in result.scores)
    lines = store.get_bytes("reports/compare/items.jsonl").decode().splitlines()
    assert len(lines) == 19 * 2


def test_cache_spares_the_models_and_a_new_judge_only_rejudges(store, tmp_path, model_cache, fake) -> None:
    benchmarks = all_benchmarks(store)[:4]
    models = (
        ModelSpec(name="tiny", preset="tiny"),
        ModelSpec(name="api", endpoint=EndpointSpec(name="fake")),
    )
    ev = evaluator(store, tmp_path, model_cache, fake)
    first, _ = run(
        ev,
        EvaluateRequest(
            "r1", models=models, benchmarks=benchmarks, judge=EndpointSpec(name="fake", model="j1")
        ),
    )
    assert [m["model_calls"] for m in first.report["models"]] == [18, 18]  # 17 items, one asks twice
    vision, judged = len(fake.vision_requests()), len(fake.judge_requests())

    again, _ = run(
        ev,
        EvaluateRequest(
            "r2", models=models, benchmarks=benchmarks, judge=EndpointSpec(name="fake", model="j1")
        ),
    )
    assert [m["model_calls"] for m in again.report["models"]] == [0, 0]
    assert [m["answers_cached"] for m in again.report["models"]] == [17, 17]
    assert len(fake.vision_requests()) == vision
    # Only the judgment that never parsed is asked again (3 attempts for each model).
    assert len(fake.judge_requests()) == judged + 2 * 3
    assert rows(again.report, "mvbench", "tiny") == rows(first.report, "mvbench", "tiny")

    # A new judge: the models are not asked again, only the judge is.
    new_judge, _ = run(
        ev,
        EvaluateRequest(
            "r3", models=models, benchmarks=benchmarks, judge=EndpointSpec(name="fake", model="j2")
        ),
    )
    assert [m["model_calls"] for m in new_judge.report["models"]] == [0, 0]
    assert len(fake.vision_requests()) == vision
    assert new_judge.report["judge"]["calls"] > 6

    # ignore_cache recomputes every answer.
    fresh, _ = run(
        ev,
        EvaluateRequest(
            "r4",
            models=models[1:],
            benchmarks=benchmarks[:1],
            judge=EndpointSpec(name="fake", model="j1"),
            ignore_cache=True,
        ),
    )
    assert fresh.report["models"][0]["model_calls"] == 4 and len(fake.vision_requests()) == vision + 4


def test_predictions_are_judged_without_a_model(store, tmp_path, model_cache, fake) -> None:
    store.put_json(
        "bench/preds/generic_preds.json",
        [
            {"video_name": "v1", "Q": "Colour?", "A": "red", "pred": "It is red."},
            {"video_name": "v2", "Q": "Colour?", "A": "blue", "pred": "It is blue."},
        ],
    )
    request = EvaluateRequest(
        "preds",
        models=(ModelSpec(name="shipped"),),
        benchmarks=(BenchmarkSpec("video_chatgpt", data_prefix="bench/preds"),),
        judge=EndpointSpec(name="fake", model="j"),
    )
    result, _ = run(evaluator(store, tmp_path, model_cache, fake), request)
    assert rows(result.report, "video_chatgpt", "shipped")["correctness"]["score"] == 3.0
    assert fake.vision_requests() == []


def test_a_model_that_fails_is_reported_and_the_rest_runs(store, tmp_path, model_cache, fake) -> None:
    store.put_bytes("runs/bad/final/config.json", b"{not json")
    data = write_mvbench(store)["data_prefix"]
    request = EvaluateRequest(
        "failures",
        models=(
            ModelSpec(name="broken", checkpoint_prefix="runs/bad/final"),
            ModelSpec(name="down", endpoint=EndpointSpec(name="down")),
            ModelSpec(name="api", endpoint=EndpointSpec(name="fake")),
        ),
        benchmarks=(BenchmarkSpec("mvbench", data_prefix=data),),
    )
    result, _ = run(
        evaluator(store, tmp_path, model_cache, fake, endpoint_timeout_seconds=2, openai_max_retries=0),
        request,
    )
    models = {m["name"]: m for m in result.report["models"]}
    assert models["broken"]["error"].startswith("could not load")
    bench = result.report["benchmarks"][0]
    assert len(bench["item_errors"]["broken"]) == 4
    assert (
        len(bench["item_errors"]["down"]) == 4 and "Connection" in bench["item_errors"]["down"][0]["reason"]
    )
    assert rows(result.report, "mvbench", "api")["overall"]["score"] == 100.0


def test_cancellation_stops_before_the_report(store, tmp_path, model_cache, fake) -> None:
    data = write_mvbench(store)["data_prefix"]
    request = EvaluateRequest(
        "cancelled",
        models=(ModelSpec(name="api", endpoint=EndpointSpec(name="fake")),),
        benchmarks=(BenchmarkSpec("mvbench", data_prefix=data),),
    )
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        run(evaluator(store, tmp_path, model_cache, fake), request, should_stop=lambda: next(calls) >= 2)
    assert not store.exists("reports/cancelled/report.json")
    assert len(fake.vision_requests()) == 2  # and those two answers are cached for the rerun


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            EvaluateRequest(
                "r", models=(ModelSpec(preset="tiny"),), benchmarks=(BenchmarkSpec("nope", data_prefix="x"),)
            ),
            "benchmarks[0].kind",
        ),
        (EvaluateRequest("r", models=(ModelSpec(preset="tiny"),), benchmarks=()), "benchmarks"),
        (
            EvaluateRequest("r", models=(ModelSpec(preset="tiny"),), benchmarks=(BenchmarkSpec("mvbench"),)),
            "benchmarks[0].data_prefix",
        ),
        (EvaluateRequest("r", models=(), benchmarks=(BenchmarkSpec("mvbench", data_prefix="x"),)), "models"),
        (
            EvaluateRequest(
                "r", models=(ModelSpec(name="p"),), benchmarks=(BenchmarkSpec("mvbench", data_prefix="x"),)
            ),
            "models[0]",
        ),
        (
            EvaluateRequest(
                "r",
                models=(ModelSpec(preset="tiny"),),
                benchmarks=(BenchmarkSpec("video_chatgpt", data_prefix="x"),),
            ),
            "judge",
        ),
        (
            EvaluateRequest("r", benchmarks=(BenchmarkSpec("style_consistency"),)),
            "benchmarks[0].frame_prefixes",
        ),
        (
            EvaluateRequest(
                "r",
                models=(ModelSpec(name="m", endpoint=EndpointSpec(name="nope")),),
                benchmarks=(BenchmarkSpec("mvbench", data_prefix="x"),),
            ),
            "models[0].endpoint.name",
        ),
        (
            EvaluateRequest(
                "r",
                models=(ModelSpec(endpoint=EndpointSpec(base_url="http://127.0.0.1:9/v1", model="m")),),
                benchmarks=(BenchmarkSpec("mvbench", data_prefix="x"),),
            ),
            "models[0].endpoint.base_url",
        ),
        (
            EvaluateRequest(
                "r",
                models=(ModelSpec(preset="tiny"),),
                benchmarks=(BenchmarkSpec("mvbench", data_prefix="x"),),
                judge=EndpointSpec(name="nope"),
            ),
            "judge.name",
        ),
        (
            EvaluateRequest(
                "../r",
                models=(ModelSpec(preset="tiny"),),
                benchmarks=(BenchmarkSpec("mvbench", data_prefix="x"),),
            ),
            "report_name",
        ),
        (
            EvaluateRequest(
                "r",
                models=(ModelSpec(preset="tiny"),),
                benchmarks=(BenchmarkSpec("mvbench", data_prefix="empty/"),),
            ),
            "benchmarks[0].data_prefix",
        ),
    ],
)
def test_requests_that_can_never_run_are_rejected(store, tmp_path, model_cache, request_, field) -> None:
    with pytest.raises(InvalidArgument) as info:
        run(evaluator(store, tmp_path, model_cache), request_)
    assert info.value.field == field


@pytest.mark.parametrize("keep", [False, True])
def test_a_checkpoint_in_storage_scores_as_its_weights_and_leaves_no_scratch(
    store, tmp_path, model_cache, keep
) -> None:
    """A trained checkpoint (here: the tiny preset's own files, uploaded as a trainer run's final/) loads
    from storage and answers as the same weights loaded directly. Its downloaded files are gone once
    loaded, unless kept for the next evaluation: scratch does not grow by a model per job."""
    from pathlib import Path

    from dreamframe.models.video_llm import resolve_model_path

    folder = Path(resolve_model_path("tiny", {}, model_cache))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(f"runs/r1/final/{path.relative_to(folder).as_posix()}", path)
    request = EvaluateRequest(
        f"from-storage-{keep}",
        models=(
            ModelSpec(name="preset", preset="tiny"),
            ModelSpec(name="stored", checkpoint_prefix="runs/r1/final"),
        ),
        benchmarks=(
            BenchmarkSpec(
                "dreamframe_mc", name="ours", data_prefix=write_dreamframe_mc(store)["data_prefix"]
            ),
        ),
    )
    result, _ = run(evaluator(store, tmp_path, model_cache, keep_downloaded_checkpoints=keep), request)
    assert not any(m.get("error") for m in result.report["models"])
    assert rows(result.report, "ours", "stored") == rows(result.report, "ours", "preset")
    scratch = tmp_path / "work" / "checkpoints"
    weights = list(scratch.rglob("*.safetensors"))
    if keep:
        assert len({p.parent for p in weights}) == 1
    else:
        assert weights == [] and not any(scratch.iterdir())


def test_frames_past_the_models_context_are_item_errors_naming_the_reason(
    store, tmp_path, model_cache
) -> None:
    """70 frames of 16 tokens overflow the tiny model's 1,024 positions: every item reports why instead
    of a score read from positions the model never saw."""
    request = EvaluateRequest(
        "too-many-frames",
        models=(ModelSpec(name="tiny", preset="tiny", num_frames=70),),
        benchmarks=(
            BenchmarkSpec(
                "dreamframe_mc", name="ours", data_prefix=write_dreamframe_mc(store)["data_prefix"]
            ),
        ),
    )
    result, _ = run(evaluator(store, tmp_path, model_cache), request)
    errors = result.report["benchmarks"][0]["item_errors"]["tiny"]
    assert errors and all(
        "more than the model's 1,024 positions" in e["reason"] or e["reason"].startswith("skipped")
        for e in errors
    )
