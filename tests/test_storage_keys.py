"""Object keys, prefixes, bucket names and the ObjectRef <-> proto bridge (pure unit tests, no I/O)."""

from __future__ import annotations

import pytest

from dreamframe.errors import InvalidArgument
from dreamframe.storage import ObjectRef, from_proto, to_proto, validate_bucket, validate_key, validate_prefix
from dreamframe.v1 import common_pb2

SHA = "ab" * 32


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "jobs/j1/frames/000123.png",
        ".hidden/file",
        "a/..x/b",  # '..' only as a whole segment is a traversal
        "x..y",
        "dir/with space/ünïcødé.txt",
        "a" * 1024,
    ],
)
def test_valid_keys_pass_unchanged(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "non-empty"),
        ("../etc/passwd", "'..' segment"),
        ("a/../b", "'..' segment"),
        ("a/..", "'..' segment"),
        ("./a", "'.' segment"),
        ("a/./b", "'.' segment"),
        ("/etc/passwd", "relative, not absolute"),
        ("/", "relative, not absolute"),
        ("a//b", "empty path segment"),
        ("a/", "empty path segment"),
        ("a/b/", "empty path segment"),
        ("a\\b", "control character or backslash"),
        ("..\\..\\windows", "control character or backslash"),
        ("a\x00b", "control character or backslash"),
        ("a\nb", "control character or backslash"),
        ("tab\there", "control character or backslash"),
        ("del\x7f", "control character or backslash"),
        ("c1\x85", "control character or backslash"),
        ("surrogate\udc80", "not valid UTF-8"),
        ("a" * 1025, "longer than 1024 bytes"),
        ("é" * 513, "longer than 1024 bytes"),  # 1026 bytes in UTF-8
    ],
)
def test_bad_keys_name_the_field_and_the_reason(key: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_key(key, field="story.key")
    assert err.value.field == "story.key"
    assert reason in err.value.message
    assert str(err.value).startswith("story.key: ")


def test_bad_key_default_field_is_key() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_key("../x")
    assert err.value.field == "key"


@pytest.mark.parametrize("key", [None, 5, b"bytes"])
def test_non_string_keys_are_rejected(key: object) -> None:
    with pytest.raises(InvalidArgument, match="non-empty object key"):
        validate_key(key)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b", "jobs/j1/frames/", "a/.", "a/..", "..", ".hid"])
def test_valid_prefixes(prefix: str) -> None:
    # The last segment of a prefix is partial: "a/.." is the start of "a/..x", a valid key.
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        ("/", "relative"),
        ("/a", "relative"),
        ("../a", "'..' segment"),
        ("a/../", "'..' segment"),
        ("a//", "empty path segment"),
        ("a\\", "backslash"),
        ("a\x00", "control character"),
        ("a/b\udc80", "not valid UTF-8"),
    ],
)
def test_bad_prefixes(prefix: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_prefix(prefix, field="frames_prefix")
    assert err.value.field == "frames_prefix"
    assert reason in err.value.message


@pytest.mark.parametrize("bucket", ["abc", "dreamframe", "my-bucket.v1", "a" * 63, "0ab"])
def test_valid_buckets(bucket: str) -> None:
    assert validate_bucket(bucket) == bucket


@pytest.mark.parametrize(
    "bucket", ["", "ab", "a" * 64, "Upper", "under_score", "-start", "end-", "a..b", ".dot"]
)
def test_bad_buckets(bucket: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_bucket(bucket, field="ref.bucket")
    assert err.value.field == "ref.bucket"
    assert "3-63 chars" in err.value.message


def test_bucket_allow_list() -> None:
    assert validate_bucket("team-a", allowed={"team-a", "dreamframe"}) == "team-a"
    with pytest.raises(InvalidArgument) as err:
        validate_bucket("team-b", field="story.bucket", allowed={"team-a", "dreamframe"})
    assert err.value.field == "story.bucket"
    assert "not allowed" in err.value.message
    assert "team-a" not in err.value.message and "dreamframe" not in err.value.message  # the list is not told


def test_a_bad_bucket_name_is_shown_only_in_part() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_bucket("X" * 5000, field="story.bucket")
    assert len(err.value.message) < 200


def test_from_proto_checks_the_allow_list() -> None:
    pb = common_pb2.ObjectRef(bucket="team-b", key="a")
    assert from_proto(pb, field="story").bucket == "team-b"  # no list given: names only
    with pytest.raises(InvalidArgument) as err:
        from_proto(pb, field="story", allowed=frozenset({"dreamframe"}))
    assert err.value.field == "story.bucket"


def test_proto_round_trip() -> None:
    ref = ObjectRef("dreamframe", "jobs/j1/story.json", 123, SHA)
    pb = to_proto(ref)
    assert isinstance(pb, common_pb2.ObjectRef)
    assert (pb.bucket, pb.key, pb.size, pb.sha256) == ("dreamframe", "jobs/j1/story.json", 123, SHA)
    assert from_proto(pb) == ref


@pytest.mark.parametrize(
    ("pb", "field", "reason"),
    [
        (common_pb2.ObjectRef(bucket="dreamframe", key="../x"), "story.key", "'..' segment"),
        (common_pb2.ObjectRef(bucket="dreamframe", key="/abs"), "story.key", "relative"),
        (common_pb2.ObjectRef(bucket="dreamframe", key=""), "story.key", "non-empty"),
        (common_pb2.ObjectRef(bucket="Bad_Bucket", key="a"), "story.bucket", "3-63 chars"),
        (common_pb2.ObjectRef(bucket="dreamframe", key="a", size=-1), "story.size", "negative"),
        (common_pb2.ObjectRef(bucket="dreamframe", key="a", sha256="XYZ"), "story.sha256", "hex"),
        (common_pb2.ObjectRef(), "story", "required"),
    ],
)
def test_from_proto_names_the_bad_field(pb: common_pb2.ObjectRef, field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        from_proto(pb, field="story")
    assert err.value.field == field
    assert reason in err.value.message


def test_from_proto_default_field_and_empty_sha() -> None:
    ref = from_proto(common_pb2.ObjectRef(bucket="dreamframe", key="a/b"))
    assert ref == ObjectRef("dreamframe", "a/b", 0, "")
    with pytest.raises(InvalidArgument) as err:
        from_proto(common_pb2.ObjectRef(bucket="dreamframe", key="a\\b"))
    assert err.value.field == "ref.key"
