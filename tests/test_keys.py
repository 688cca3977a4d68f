from __future__ import annotations

import pytest

from dreamframe import keys
from dreamframe.errors import InvalidArgument
from dreamframe.storage.base import validate_key


def test_layout():
    assert keys.frame_key("job-1", 2, 123) == "jobs/job-1/stories/002/frames/000123.png"
    assert keys.frame_sidecar_key("job-1", 2, 123) == "jobs/job-1/stories/002/frames/000123.json"
    assert keys.story_key("j") == "jobs/j/stories/000/story.json"
    assert keys.dataset_prefix("d1") == "datasets/d1/"
    # every derived key is a valid object key
    for key in (keys.frame_key("a", 0, 0), keys.reference_story_key("a"), keys.job_state_key("a")):
        assert validate_key(key) == key


@pytest.mark.parametrize("bad", ["", "..", "a/b", "-x", "a..b", "x" * 200, "sp ace"])
def test_bad_ids_name_the_field(bad):
    with pytest.raises(InvalidArgument) as info:
        keys.job_prefix(bad)
    assert info.value.field == "job_id"


def test_negative_story_index():
    with pytest.raises(InvalidArgument) as info:
        keys.story_prefix("j", -1)
    assert info.value.field == "story_index"
