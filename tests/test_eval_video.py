"""Frames for benchmark items: PyAV decoding with start/end windows, frame folders and frame lists,
object-store and local-directory sources."""

from __future__ import annotations

import pytest
from test_eval_support import BLUE, GREEN, RED, dominant, make_store, mp4_bytes, png_bytes

from dreamframe.errors import InvalidArgument
from services.evaluator.items import Visual, resolve_visual
from services.evaluator.sources import LocalSource, Source, StoreSource, open_location
from services.evaluator.video import decode_video


def test_decode_samples_uniformly_and_honours_the_window(tmp_path) -> None:
    # 12 frames at 4 fps: red 0-1 s, green 1-2 s, blue 2-3 s.
    data = mp4_bytes([RED] * 4 + [GREEN] * 4 + [BLUE] * 4)
    assert [dominant(f) for f in decode_video(data, 3)] == ["red", "green", "blue"]
    assert {dominant(f) for f in decode_video(data, 4, start=1.1, end=1.9)} == {"green"}
    assert {dominant(f) for f in decode_video(data, 2, start=2.1)} == {"blue"}
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    frames = decode_video(path, 6)
    assert len(frames) == 6 and frames[0].mode == "RGB" and frames[0].size == (32, 32)


def test_undecodable_video_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="decode"):
        decode_video(b"this is not an mp4", 4)


def test_visual_from_store_video_and_frame_folder(tmp_path) -> None:
    store = make_store(tmp_path)
    store.put_bytes("b/videos/clip.mp4", mp4_bytes([RED] * 4 + [BLUE] * 4))
    for i in (1, 2, 10, 11):  # not zero-padded: natural order is 1, 2, 10, 11
        store.put_bytes(f"b/frames/tvqa_clip/{i}.jpg", png_bytes(RED if i < 10 else BLUE))
    source = StoreSource(store)

    video = resolve_visual(source, ["b/videos/nope.mp4", "b/videos/clip.mp4"], start=1.1, end=2.0)
    assert video is not None and video.kind == "video" and video.key == "b/videos/clip.mp4"
    assert {dominant(f) for f in video.load_frames(3, tmp_path / "scratch")} == {"blue"}
    assert list((tmp_path / "scratch").iterdir()) == []  # the downloaded copy is removed

    # A folder of images is a frame-type video (MVBench's TVQA); 4 frames at 1 fps, window 2-3 s.
    folder = resolve_visual(source, ["b/frames/tvqa_clip"], start=2.0, end=3.0, folder_fps=1.0)
    assert folder is not None and folder.kind == "frames"
    assert [k.rsplit("/", 1)[1] for k in folder.frame_keys] == ["1.jpg", "2.jpg", "10.jpg", "11.jpg"]
    assert {dominant(f) for f in folder.load_frames(2, tmp_path)} == {"blue"}
    assert resolve_visual(source, ["b/videos/absent.mp4", "b/frames/none"]) is None


def test_visual_identity_changes_with_what_is_shown(tmp_path) -> None:
    source = StoreSource(make_store(tmp_path))
    a = Visual(source, "video", "x.mp4")
    assert a.identity() == Visual(source, "video", "x.mp4").identity()
    assert a.identity() != Visual(source, "video", "x.mp4", start=1.0).identity()
    assert a.identity() != Visual(source, "video", "y.mp4").identity()


def test_join_never_escapes_its_base() -> None:
    assert Source.join("bench/mvbench", "video/./a.mp4") == "bench/mvbench/video/a.mp4"
    assert Source.join("", "/a/b.mp4") == "a/b.mp4"
    with pytest.raises(InvalidArgument):
        Source.join("bench", "../secrets.json")


def test_local_directories_only_when_allowed(tmp_path) -> None:
    store = make_store(tmp_path)
    root = tmp_path / "benchmarks"
    (root / "mvbench").mkdir(parents=True)
    (root / "mvbench" / "a.mp4").write_bytes(mp4_bytes([RED] * 4))
    source, base = open_location(f"file://{root}/mvbench", store, local_roots=[root], field="data_prefix")
    assert isinstance(source, LocalSource)
    key = source.join(base, "a.mp4")
    assert source.exists(key) and source.list(base) == [key]
    assert not source.exists(str(tmp_path / "store" / "dreamframe" / "x"))  # outside the root
    with pytest.raises(InvalidArgument, match="local_data_roots"):
        open_location(f"file://{tmp_path}", store, local_roots=[root], field="data_prefix")
    with pytest.raises(InvalidArgument, match="absolute"):
        open_location("file://relative/dir", store, local_roots=[root], field="data_prefix")
    with pytest.raises(InvalidArgument):
        open_location("../up", store, field="data_prefix")
