"""models.build_once: a cached folder built into a temp folder and renamed; never half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamframe.models import build_once


def complete(target: Path) -> bool:
    return (target / "done.json").exists()


def test_builds_once_then_reuses(tmp_path):
    builds: list[Path] = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "done.json").write_text("{}")

    target = tmp_path / "cache" / "tiny-v1"
    assert build_once(target, build, complete=complete, tmp_prefix=".tiny-") == target
    assert build_once(target, build, complete=complete, tmp_prefix=".tiny-") == target
    assert len(builds) == 1 and builds[0].parent == target.parent and builds[0].name.startswith(".tiny-")
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-v1"]  # no temp folder left
    assert (target / "weights.bin").read_bytes() == b"w"


def test_a_failed_build_leaves_nothing(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"h")
        raise RuntimeError("out of memory")

    target = tmp_path / "tiny-v1"
    with pytest.raises(RuntimeError, match="out of memory"):
        build_once(target, build, complete=complete, tmp_prefix=".tiny-")
    assert list(tmp_path.iterdir()) == []


def test_the_winner_of_a_race_is_used(tmp_path):
    target = tmp_path / "tiny-v1"

    def build(tmp: Path) -> None:
        (tmp / "done.json").write_text("mine")
        target.mkdir()  # another process renamed its copy into place meanwhile
        (target / "done.json").write_text("theirs")

    assert build_once(target, build, complete=complete, tmp_prefix=".tiny-") == target
    assert (target / "done.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-v1"]


def test_an_incomplete_folder_in_the_way_is_an_error(tmp_path):
    target = tmp_path / "tiny-v1"
    target.mkdir()
    (target / "junk").write_text("x")  # not complete: nothing to use, and the rename cannot replace it

    def build(tmp: Path) -> None:
        (tmp / "done.json").write_text("{}")

    with pytest.raises(OSError):
        build_once(target, build, complete=complete, tmp_prefix=".tiny-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-v1"]
