"""dreamframe.disk_space: free space as the kubelet will judge it, and the error a caller sees."""

from __future__ import annotations

import os
from collections import namedtuple

import pytest

from dreamframe import disk_space
from dreamframe.errors import ResourceExhausted

Usage = namedtuple("Usage", "total used free")


def test_used_bytes_counts_allocated_blocks_once_and_does_not_follow_links(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "a" / "one", tmp_path / "again")  # the same file: counted once
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_bytes(b"y" * 1_000_000)
    (tmp_path / "link").symlink_to(outside)  # not followed
    try:
        used = disk_space.used_bytes(tmp_path)
        blocks = (tmp_path / "a" / "one").stat().st_blocks + (tmp_path / "link").lstat().st_blocks
        assert used == blocks * 512 and 100_000 <= used < 1_000_000
    finally:
        outside.unlink()


def test_a_size_limit_counts_what_its_volume_holds(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(1 << 40, 0, 1 << 40))
    monkeypatch.setattr(disk_space, "mount_root", lambda path: tmp_path)  # as if tmp_path were the emptyDir
    (tmp_path / "held").write_bytes(b"z" * (1 << 20))
    held = disk_space.used_bytes(tmp_path)
    work = tmp_path / "trainer" / "not-made-yet"
    # statvfs shows the node's terabyte; the kubelet evicts past the limit.
    assert disk_space.free_bytes(work) == 1 << 40
    assert disk_space.free_bytes(work, size_limit=10 << 20) == (10 << 20) - held
    assert disk_space.free_bytes(work, size_limit=1024) == 0


def test_require_free_names_the_setting_and_the_figures(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(1 << 40, 0, 3 << 30))
    disk_space.require_free(tmp_path, 2 << 30, field="trainer.work_dir", what="this run")
    disk_space.require_free(tmp_path, 0, field="trainer.work_dir", what="nothing")
    with pytest.raises(ResourceExhausted) as err:
        disk_space.require_free(tmp_path, 5 << 30, field="trainer.work_dir", what="this run")
    assert err.value.field == "trainer.work_dir"
    assert err.value.message == (
        "this run needs about 5.2 GiB of disk, but 3.0 GiB is free: free some space, "
        "or point trainer.work_dir at a larger disk"
    )


def test_mount_root_is_a_mount_point_above_the_path(tmp_path) -> None:
    root = disk_space.mount_root(tmp_path / "missing" / "deeper")
    assert os.path.ismount(root) and str(tmp_path).startswith(str(root))
