"""The `dreamframe` command line: story import/export, health, and argument handling (typer's runner)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dreamframe.cli import commands as cli
from dreamframe.config import get_settings

runner = CliRunner()


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMFRAME_STORAGE__BACKEND", "local")
    monkeypatch.setenv("DREAMFRAME_STORAGE__ROOT", str(tmp_path / "store"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def reference_story() -> dict:
    return {
        "overview": "A keeper and a robot.",
        "character": {"Ada": "a woman looks like Meryl Streep in grey"},
        "img_diag": [
            [
                "frame",
                "generate an image in Noir style: at the lighthouse, a woman looks like Meryl Streep in grey "
                "is standing",
            ],
            ["dialogue", "Ada: Who are you?"],
        ],
        "QA": [{"Question": "Where is Ada?", "Answer": "At the lighthouse."}],
    }


def test_import_story_checks_and_uploads(local_store):
    path = local_store / "story.json"
    path.write_text(json.dumps(reference_story()))
    result = runner.invoke(cli.app, ["import-story", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 frames, 1 QA" in result.output and "uploads/" in result.output
    assert list((local_store / "store" / "dreamframe" / "uploads").glob("*.json"))


def test_import_story_names_the_bad_field(local_store):
    path = local_store / "bad.json"
    bad = reference_story()
    bad["img_diag"][0][0] = "picture"
    path.write_text(json.dumps(bad))
    result = runner.invoke(cli.app, ["import-story", str(path)])
    assert result.exit_code == 2
    assert "img_diag.0.0" in result.output


def test_export_story_of_a_missing_job_is_a_clear_error(local_store):
    result = runner.invoke(cli.app, ["export-story", "no-such-job"])
    assert result.exit_code == 2
    assert "no story 0 in job no-such-job" in result.output


def test_health_fails_for_an_address_nobody_serves(local_store):
    result = runner.invoke(cli.app, ["health", "127.0.0.1:1", "--timeout", "1"])
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_run_passes_only_options_up_accepts():
    import inspect

    source = inspect.getsource(cli.run)
    call = source[source.index("up(") : source.index(")", source.index("up("))]
    accepted = set(inspect.signature(cli.up).parameters)
    passed = {part.split("=")[0].strip() for part in call.removeprefix("up(").split(",") if "=" in part}
    assert passed <= accepted, passed - accepted


def test_unknown_preset_is_refused(local_store):
    result = runner.invoke(cli.app, ["up", "--preset", "sd15"])
    assert result.exit_code == 2
    assert "unknown preset" in result.output


def test_stage_times_are_shown_from_the_jobs_timestamps():
    from dreamframe.v1 import coordinator_pb2 as pb

    status = pb.StageStatus(stage=pb.STAGE_RENDER, state=pb.JOB_STATE_QUEUED)
    assert cli.stage_duration(status) == "-"
    status.started_at.FromSeconds(1_000)
    assert cli.stage_duration(status, now=1_004.25) == "4.2s so far"
    status.finished_at.FromSeconds(1_000 + 187)
    assert cli.stage_duration(status, now=5_000) == "3m07s"
    status.finished_at.FromSeconds(1_000 + 2 * 3600 + 5 * 60)
    assert cli.stage_duration(status) == "2h05m"
    assert cli.stage_times(status) == (1_000.0, 1_000.0 + 7500)


def test_the_progress_bar_time_column_ticks_while_a_stage_runs():
    import time

    from rich.progress import Progress

    progress = Progress()
    running = progress.add_task("render", started=time.time() - 75, finished=None)
    finished = progress.add_task("plot", started=100.0, finished=112.5)
    waiting = progress.add_task("train", started=None)
    column = cli._StageTime()
    assert column.render(progress.tasks[running]).plain in ("1m15s", "1m16s")
    assert column.render(progress.tasks[finished]).plain == "12.5s"
    assert column.render(progress.tasks[waiting]).plain == "-"


# --- dataset check ---------------------------------------------------------------------------------------


def test_dataset_check_reports_bad_records_by_id(tmp_path):
    from test_qa_profiles import broken_dataset

    broken_dataset(tmp_path / "ds")
    result = runner.invoke(cli.app, ["dataset", "check", "--profile", "llama-vid", str(tmp_path / "ds")])
    assert result.exit_code == 1, result.output
    for rid in ("early-question", "frames-only", "no-image-token", "gpt-first", "missing-video"):
        assert f"] {rid}: " in result.output
    assert "] good: " not in result.output
    assert "llama-vid: 10 records in 1 files, 9 bad" in result.output
    assert "text-query tokens counted" in result.output  # exact (BERT vocabulary) or approximate


def test_dataset_check_of_a_built_dataset_in_storage_passes(local_store):
    from test_qa_generator import JOB, make_story, put_story

    from dreamframe.storage import open_store
    from services.qa_generator.builder import BuildRequest, build_dataset
    from services.qa_generator.options import make_options

    store = open_store(get_settings().storage)
    source = put_story(store, 0, make_story("c"))
    options = make_options(video_size=16, include_subtitles=True, profile="llava-next-video")
    build_dataset(store, BuildRequest(JOB, "", [source], options))
    result = runner.invoke(cli.app, ["dataset", "check", "--profile", "llava-next-video", f"datasets/{JOB}/"])
    assert result.exit_code == 0, result.output
    assert "0 bad" in result.output


def test_dataset_check_usage_errors(local_store):
    result = runner.invoke(cli.app, ["dataset", "check", "--profile", "llava", "datasets/none/"])
    assert result.exit_code == 2 and "profile" in result.output
    result = runner.invoke(cli.app, ["dataset", "check", "datasets/none/"])
    assert result.exit_code == 2 and "datasets/none/manifest.json" in result.output


def test_run_shows_the_contact_sheets_the_storyboard_writes(tmp_path, capsys):
    """`make run`'s closing list names files that exist: the storyboard's own contact-sheet names."""
    from dreamframe import storyboard
    from dreamframe.v1 import coordinator_pb2 as pb

    root = tmp_path / "runs" / "j"
    (root / "storyboard").mkdir(parents=True)
    for page in (0, 1):
        (root / "storyboard" / storyboard.contact_sheet_name(0, page)).write_bytes(b"jpeg")
    cli._print_results(pb.Job(job_id="j"), {"job": root}, 1.0)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "contact sheets" in line)
    assert storyboard.contact_sheet_name(0, 0) in line and "not made" not in line
    assert "(2 sheets)" in out


def test_ls_never_cuts_a_job_id_in_a_narrow_terminal():
    import io

    from rich.console import Console

    from dreamframe.v1 import coordinator_pb2 as pb

    job = pb.Job(job_id="20261205-012519-fe6cce", state=pb.JOB_STATE_SUCCEEDED, story_count=2)
    job.spec.name = "tiny local run"
    for stage in (pb.STAGE_PLOT, pb.STAGE_STYLE, pb.STAGE_RENDER, pb.STAGE_DATASET, pb.STAGE_TRAIN):
        job.stages.add(stage=stage)
    out = io.StringIO()
    Console(file=out, width=80).print(cli.jobs_table([job]))
    row = out.getvalue().split("\n")[3]
    assert "20261205-012519-fe6cce" in row  # whole, to paste into status/watch/cancel
    assert "succeeded" in row
