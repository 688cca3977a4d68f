"""The evaluator's command line: the same evaluation as the service, from settings in the environment."""

from __future__ import annotations

import json

import pytest
from test_eval_support import BLUE, RED, FakeOpenAI, make_store, write_mvbench, write_story_frames

from dreamframe.config import get_settings
from services.evaluator import cli


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMFRAME_STORAGE__ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("DREAMFRAME_STORAGE__BUCKET", "dreamframe")
    monkeypatch.setenv("DREAMFRAME_EVALUATOR__WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("DREAMFRAME_EVALUATOR__NUM_FRAMES", "3")
    monkeypatch.setenv("DREAMFRAME_MODELS__CACHE_DIR", str(tmp_path / "models"))
    get_settings.cache_clear()
    yield make_store(tmp_path)
    get_settings.cache_clear()


def test_cli_writes_the_report_and_prints_headlines(env, capsys) -> None:
    data = write_mvbench(env)["data_prefix"]
    red = write_story_frames(env, "jobs/j/stories/000/frames/", RED)
    blue = write_story_frames(env, "jobs/j/stories/001/frames/", BLUE)
    with FakeOpenAI() as fake:
        code = cli.main(
            [
                "--name",
                "cli-run",
                "--model",
                f"api=endpoint:{fake.base_url}#vision",
                "--benchmark",
                f"mvbench={data}",
                "--style",
                red,
                "--style",
                blue,
                "--max-items",
                "2",
            ]
        )
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)
    assert summary["report_json"]["key"] == "reports/cli-run/report.json"
    assert summary["headline"]["mvbench/api"] == 100.0
    assert summary["headline"]["style_consistency/"] > 0
    assert "[items] " in out.err
    report = env.get_json("reports/cli-run/report.json")
    assert sum(r["items"] for r in report["benchmarks"][0]["scores"]["api"] if r["task"] != "overall") == 3


def test_cli_reports_bad_arguments(env, capsys) -> None:
    assert cli.main(["--name", "x", "--model", "m=somewhere", "--benchmark", "mvbench=bench"]) == 2
    assert "LABEL=checkpoint:PREFIX" in capsys.readouterr().err
    assert cli.main(["--name", "x", "--model", "m=preset:tiny", "--benchmark", "nope=bench"]) == 2
    assert "unknown benchmark format" in capsys.readouterr().err


def test_cli_names_a_configured_endpoint(env, monkeypatch, capsys) -> None:
    data = write_mvbench(env)["data_prefix"]
    with FakeOpenAI() as fake:
        monkeypatch.setenv("DREAMFRAME_EVALUATOR__ENDPOINTS__VISION__BASE_URL", fake.base_url)
        monkeypatch.setenv("DREAMFRAME_EVALUATOR__ENDPOINTS__VISION__MODEL", "vision")
        get_settings.cache_clear()
        argv = ["--name", "named", "--benchmark", f"mvbench={data}", "--max-items", "1"]
        code = cli.main([*argv, "--model", "api=endpoint:vision"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert json.loads(out.out)["headline"]["mvbench/api"] == 100.0
        assert len(fake.vision_requests()) == 2  # one item per task file
        assert cli.main([*argv, "--model", "api=endpoint:nope"]) == 2
        assert (
            "models[0].endpoint.name: unknown endpoint 'nope'; configured: vision" in capsys.readouterr().err
        )


def test_cli_exits_non_zero_when_no_item_is_scored(env, monkeypatch, capsys) -> None:
    # Every answer fails (the endpoint is down): the report is written, but it holds no score.
    monkeypatch.setenv("DREAMFRAME_EVALUATOR__OPENAI_MAX_RETRIES", "0")
    get_settings.cache_clear()
    data = write_mvbench(env)["data_prefix"]
    argv = ["--name", "down", "--benchmark", f"mvbench={data}", "--max-items", "1"]
    code = cli.main([*argv, "--model", "api=endpoint:http://127.0.0.1:9/v1#vision"])
    out = capsys.readouterr()
    assert code == 1, out.err
    assert json.loads(out.out)["headline"]["mvbench/api"] is None
    assert "error: no item could be scored; see reports/down/report.md" in out.err
