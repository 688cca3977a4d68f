"""Answer extraction against known tricky outputs, per benchmark rule set; frame sampling indices."""

from __future__ import annotations

import pytest

from services.evaluator import extract as ex
from services.evaluator.video import segment_indices, window_indices

CANDIDATES = ["the man sits down", "the man stands up", "the woman waves", "nothing happens"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("A) the man sits down", "A"),
        ("B", "B"),
        ("(C) the woman waves", "C"),
        ("D. nothing happens", "D"),
        ("c)", "C"),  # MVBench lower-cases: a lone lower-case option is an option
        ("Best option: (B) the man stands up", "B"),
        ("the woman waves", "C"),  # no letter, but exactly a candidate's text
        ("The woman waves.", "C"),
        ("", None),  # names no option (MVBench's check_ans counts it as right: the official column)
        ("E) something else", None),  # not an option of this item
        ("a man sits down", None),  # the article "a" is not option A
        ("I think it's the second one", None),
    ],
)
def test_mvbench_letter(output: str, expected: str | None) -> None:
    # The lenient reading (a separate column); the official outcomes are in test_eval_official_mvbench.py.
    assert ex.mvbench_letter(output, CANDIDATES) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("A. dunking a basketball", "A. dunking a basketball", 1),
        ("C", "C. dunking a basketball", 1),
        ("B", "C. dunking a basketball", 0),
        ("B. passing</s>", "B. passing", 1),
        ("C) dunking", "C. dunking", 1),
        ("A) dunking", "C. dunking", 0),
        ("The man is dunking a basketball.", "C. dunking a basketball", None),  # rules fail → judge
        ("E", "A. x", None),
    ],
)
def test_tempcompass_multi_choice(prediction: str, answer: str, expected: int | None) -> None:
    assert ex.tempcompass_multi_choice(prediction, answer) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Yes, it is.", "yes", 1),
        ("no", "yes", 0),
        ("NO.", "no", 1),
        ("Maybe", "no", None),
        ("It is not", "no", None),
    ],
)
def test_tempcompass_yes_no(prediction: str, answer: str, expected: int | None) -> None:
    assert ex.tempcompass_yes_no(prediction, answer) == expected


CAPTION_Q = (
    "Which caption matches the video better?\nCaption A: A man is dunking.\nCaption B: A man is passing."
)


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Caption A", 1),
        ("Caption A.", 1),
        ("Caption A: A man is dunking.", 1),
        ("A man is dunking.", 1),
        ("Caption B", 0),
        ("A man is passing.", 0),
        ("The first caption", None),
    ],
)
def test_tempcompass_caption_matching(prediction: str, expected: int | None) -> None:
    assert ex.tempcompass_caption_matching(prediction, CAPTION_Q, "Caption A: A man is dunking.") == expected


def test_tempcompass_caption_rating_needs_one_right_option() -> None:
    assert ex.tempcompass_caption_rating("Reasoning: it says so.\nAnswer: B. blue", "B. blue") == 1
    assert ex.tempcompass_caption_rating("Reasoning: hmm\nAnswer: A. red", "B. blue") == 0
    assert ex.tempcompass_caption_rating("Answer: A. red or B. blue", "B. blue") == 0  # two options named
    assert ex.tempcompass_caption_rating("Answer: None of the choices are correct", "B. blue") == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # TempCompass's llm_output_to_rating is case-sensitive; None = its assertion fails (asked again).
        ("Correct", True),
        ("Incorrect", False),
        ("The prediction is incorrect.", None),  # no "Correct"/"Incorrect" with a capital
        ("correct.", None),
        ("I don't know", None),
        ("Correct or incorrect?", True),  # starts with "Correct"
        ("The prediction is Correct.", True),  # "Correct" and no "Incorrect"
        ("It is Correct, not Incorrect", False),  # "Incorrect" anywhere wins when neither starts it
    ],
)
def test_judge_correct(text: str, expected: bool | None) -> None:
    assert ex.judge_correct(text) == expected


CHOICES = {"A": "81", "B": "37", "C": "18", "D": "100"}


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "B"),
        ("(C)", "C"),
        ("D.100", "D"),
        ("The answer is A", "A"),
        ("37", "B"),
        ("There are about 40 people", None),  # free-form: the judge maps it
        ("E", None),
        ("a lot of people", None),
    ],
)
def test_videobench_letter(output: str, expected: str | None) -> None:
    assert ex.videobench_letter(output, CHOICES) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{'score': 4}", 4.0),
        ("{'score': 4.8}", 4.8),
        ('{"score": 3}', 3.0),
        ("{'score': '2'}", 2.0),
        ("```python\n{'score': 5}\n```", 5.0),
        ("Sure! {'score': 1}", 1.0),
        ("{''score': 4.8}", None),  # the reference prompt's own (malformed) example
        ("{'score': 7}", None),  # out of range
        ("{'score': True}", None),
        ("{'pred': 'yes'}", None),
        ("four", None),
        ("", None),
    ],
)
def test_parse_score(text: str, expected: float | None) -> None:
    assert ex.parse_score(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"maximum probability":"B"}', "B"),
        ("{'maximum probability': 'C'}", "C"),
        ('Here: {"maximum probability": "(A)"}', "A"),
        ('{"maximum probability":"G"}', None),
        ('{"maximum probability":"B or C"}', None),
        ("B", None),
    ],
)
def test_parse_choice(text: str, expected: str | None) -> None:
    assert ex.parse_choice(text, ["A", "B", "C", "D"]) == expected


def test_segment_indices_cover_the_window_like_mvbench() -> None:
    assert segment_indices(0, 15, 4) == [2, 6, 10, 14]  # middles of 0-3, 4-7, 8-11, 12-15
    assert segment_indices(0, 7, 8) == [0, 1, 2, 3, 4, 5, 6, 7]  # as many frames as wanted: each once
    assert segment_indices(10, 19, 2) == [12, 17]
    assert segment_indices(0, 2, 6) == [0, 0, 1, 1, 2, 2]  # fewer frames than asked: repeats
    with pytest.raises(Exception, match="num_frames"):
        segment_indices(0, 5, 0)


def test_window_indices_honour_start_and_end_seconds() -> None:
    # 40 frames at 10 fps = 4 s; window 1.0-2.0 s is frames 10-20.
    picked = window_indices(40, 10.0, 4, 1.0, 2.0)
    assert all(10 <= i <= 20 for i in picked) and picked == sorted(picked)
    assert window_indices(40, 10.0, 2, 3.9, 99.0) == [39, 39]  # clipped to the last frame
    assert window_indices(0, 10.0, 4) == []
