"""`make lock`: write requirements/lock.txt, the versions every install takes (`pip install -c lock.txt ...`).

1. Ask the package index what its torch for Linux (the CUDA build) pins exactly: triton, CUDA's wheels. They
   go to requirements/cuda-torch.txt, a constraint of step 2, so the lock holds for that build too.
2. pip-compile pyproject.toml with every extra on this machine, keeping the lock's other pins where
   pyproject.toml allows (pass --upgrade to move them all). torch is whatever build pip finds here (the CPU
   wheel on the project's machines): its local label (+cpu) is dropped, so that `torch==X` takes the CPU wheel
   here and the CUDA build in the GPU images.
3. Resolve what the images install (every service extra and the proto tools, with the images' Python on
   Linux x86_64, so PyPI's CUDA torch) against those pins, and append what only they need: CUDA's wheels, and
   any package that only the images' Python asks for. Where nothing asks for them, such pins install nothing.

It needs the package index (metadata only: no wheel is downloaded) and pip-tools (the dev extra).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
CUDA_TORCH = ROOT / "requirements" / "cuda-torch.txt"
# The images' Python (deploy/Dockerfile: python:3.12-slim-bookworm, Ubuntu 24.04's python3 on the CUDA base)
# and glibc (the older of the two: Debian bookworm's 2.36).
IMAGE_PYTHON = "3.12"
PLATFORMS = [
    *(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
IMAGE_MARKERS = default_environment() | {
    "python_version": IMAGE_PYTHON,
    "python_full_version": f"{IMAGE_PYTHON}.0",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# Extras no image installs (proto's tools run in the image build, so they are resolved for it too).
NOT_IN_IMAGES = {"dev"}


def pip_resolve(*requirements: str, constraints: tuple[Path, ...] = (), no_deps: bool = False) -> list[dict]:
    """What `pip install` would install in an image (Python 3.12, Linux x86_64, wheels only): pip's report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
            "--only-binary=:all:", "--python-version", IMAGE_PYTHON,
            *(f"--platform={p}" for p in PLATFORMS),
            "--target", str(Path(tmp) / "target"), "--report", str(report),
            *(f"--constraint={c}" for c in constraints), *(["--no-deps"] if no_deps else []), *requirements,
        ]  # fmt: skip
        subprocess.run(command, cwd=ROOT, check=True)
        return json.loads(report.read_text())["install"]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            out[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    return out


def torch_version(project: dict) -> str:
    every = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    (version,) = {str(r.specifier).removeprefix("==") for r in map(Requirement, every) if r.name == "torch"}
    return version


def write_cuda_torch(version: str) -> None:
    (torch,) = pip_resolve(f"torch=={version}", no_deps=True)
    exact = []
    for spec in torch["metadata"].get("requires_dist", []):
        requirement = Requirement(spec)
        if requirement.marker and not requirement.marker.evaluate(IMAGE_MARKERS | {"extra": ""}):
            continue
        (specifier, *more) = requirement.specifier or [None]
        if specifier is not None and specifier.operator == "==" and not more:
            exact.append(f"{canonicalize_name(requirement.name)}=={specifier.version}")
    CUDA_TORCH.write_text(
        f"# Written by `make lock` (requirements/lock.py): what torch=={version} for Linux on the package\n"
        "# index (the CUDA build the GPU images install) pins exactly. A constraint of the lock, so that\n"
        "# the lock's other pins agree with that build too.\n" + "".join(f"{pin}\n" for pin in sorted(exact))
    )


def compile_lock(extra_args: list[str]) -> None:
    env = os.environ | {"CUSTOM_COMPILE_COMMAND": "make lock"}
    command = [
        sys.executable, "-m", "piptools", "compile", "--quiet", "--all-extras", "--strip-extras",
        "--allow-unsafe", "--no-emit-index-url", "--no-emit-find-links", "--no-emit-trusted-host",
        "--constraint", str(CUDA_TORCH.relative_to(ROOT)), "--output-file", str(LOCK.relative_to(ROOT)),
        *extra_args, "pyproject.toml",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    # torch==2.13.0+cpu -> torch==2.13.0: the same pin for the CPU wheel and the CUDA build
    LOCK.write_text(re.sub(r"^(torch==[^+\s]+)\+\S+", r"\1", LOCK.read_text(), flags=re.M))


def append_image_pins(project: dict) -> None:
    extras = sorted(set(project["optional-dependencies"]) - NOT_IN_IMAGES)
    locked = pins(LOCK)
    more = sorted(
        f"{canonicalize_name(item['metadata']['name'])}=={item['metadata']['version']}"
        for item in pip_resolve(f".[{','.join(extras)}]", constraints=(LOCK,))
        if canonicalize_name(item["metadata"]["name"]) not in locked | {project["name"]: ""}
    )
    with LOCK.open("a") as lock:
        lock.write(
            f"\n# Only in the images (Python {IMAGE_PYTHON}, Linux x86_64, the package index's torch: its\n"
            "# CUDA build), resolved by `make lock` against the pins above:\n"
            + "".join(f"{pin}\n" for pin in more)
        )


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    write_cuda_torch(torch_version(project))
    compile_lock(sys.argv[1:])
    append_image_pins(project)
    print(f"{LOCK.relative_to(ROOT)}: {len(pins(LOCK))} pins")


if __name__ == "__main__":
    main()
