"""Video-ChatGPT's official scoring (mbzuai-oryx/Video-ChatGPT, quantitative_evaluation/): which prediction
file gets which criterion, the five prompts, how a judge reply is read and how scores average.

Expected outcomes are what evaluate_benchmark_{1_correctness,2_detailed_orientation,3_context,4_temporal,
5_consistency}.py give, worked out from them by hand: ``annotate`` keeps ``ast.literal_eval(reply)`` and
``json.dump``s it (an exception there: nothing saved, ``main``'s while loop asks again); ``main`` averages
``int(result[0]['score'])`` over every saved file, with no range check (an exception there crashes the
script: here such a reply is malformed and asked again). evaluate_benchmark.sh runs each script on its own
prediction file: correctness_pred, detailed_orientation_pred, contextual_pred, temporal_understanding_pred,
consistency_pred.
"""

from __future__ import annotations

import re
from collections import Counter

import openai
import pytest
from test_eval_support import FakeOpenAI, make_store

from services.evaluator.benchmarks import BENCHMARKS
from services.evaluator.benchmarks.base import Location
from services.evaluator.judge import Judge, video_chatgpt_score_reply
from services.evaluator.prompts import video_chatgpt_messages
from services.evaluator.sources import StoreSource


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("{'score': 4}", 4.0),
        ("{'pred': 'yes', 'score': 4}", 4.0),  # other keys are ignored
        ('{"score": 3}', 3.0),  # a JSON dict is a Python literal too
        ("  {'score': 2}\n", 2.0),  # literal_eval ignores surrounding whitespace
        ("{'score': 0}", 0.0),
        ("{'score': 6}", 6.0),  # no range check: counted as 6
        ("{'score': -1}", -1.0),  # counted as -1
        ("{'score': 4.8}", 4.0),  # int() truncates
        ("{'score': '4'}", 4.0),  # int('4')
        ("{'score': True}", 1.0),  # int(True)
        ("{'score': '4.5'}", None),  # int('4.5') raises in main: malformed
        ("{'score': 'four'}", None),
        ("{'score': None}", None),
        ("{'Score': 4}", None),  # KeyError in main
        ("{'score': 4, 'seen': {1, 2}}", None),  # json.dump of a set raises in annotate
        ("Here is my evaluation: {'score': 4}", None),  # text around: SyntaxError, asked again
        ("{'score': 4} The prediction is close.", None),
        ("```python\n{'score': 4}\n```", None),
        ("{''score': 4.8}", None),  # the scripts' own example is not a valid literal
        ("4", None),  # not a dict: result[0]['score'] raises in main
        ("[{'score': 4}]", None),
        ("", None),
    ],
)
def test_judge_reply_read_as_the_scripts(reply: str, expected: float | None) -> None:
    assert video_chatgpt_score_reply(reply) == expected


FIELDS = {"Q": "QQ", "A": "AA", "pred": "PP", "Q1": "Q1x", "Q2": "Q2x", "pred1": "P1", "pred2": "P2"}


def test_prompts_are_the_scripts_verbatim() -> None:
    correctness = video_chatgpt_messages("correctness", FIELDS)
    assert [m["role"] for m in correctness] == ["system", "user"]
    assert correctness[1]["content"] == (
        "Please evaluate the following video-based question-answer pair:\n\n"
        "Question: QQ\nCorrect Answer: AA\nPredicted Answer: PP\n\n"
        "Provide your evaluation only as a factual accuracy score where the factual accuracy score is an "
        "integer value between 0 and 5, with 5 indicating the highest level of factual consistency. "
        "Please generate the response in the form of a Python dictionary string with keys 'score', where its "
        "value is the factual accuracy score in INTEGER, not STRING."
        "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
        "For example, your response should look like this: {''score': 4.8}."
    )
    context = video_chatgpt_messages("contextual_understanding", FIELDS)[1]["content"]
    assert "where its value is contextual understanding score in INTEGER" in context  # no "the" in 3_context
    consistency = video_chatgpt_messages("consistency", FIELDS)
    assert "for the two questions .Your task is to compare" in consistency[0]["content"]
    assert (
        "Question 1: Q1x\nQuestion 2: Q2x\nCorrect Answer: AA\n"
        "Predicted Answer to Question 1: P1\nPredicted Answer to Question 2: P2\n\n"
    ) in consistency[1]["content"]
    temporal = video_chatgpt_messages("temporal_understanding", FIELDS)[1]["content"]
    assert "a temporal accuracy score where the temporal accuracy score" in temporal
    assert "highest level of temporal consistency" in temporal


# --- the five prediction files of evaluate_benchmark.sh --------------------------------------------------
def write_five_files(store, root: str = "vcgpt_preds") -> None:
    generic = [
        {"video_name": "v_1", "Q": "What is the man doing?", "A": "He is skating.", "pred": "He skates."},
        {"video_name": "v_2", "Q": "Where is he?", "A": "In a park.", "pred": "Outside, chatty"},
    ]
    # The same questions and answers in the three generic files (the README: one gt file for scripts 1-3).
    for name in ("correctness_pred", "detailed_orientation_pred", "contextual_pred"):
        store.put_json(f"{root}/{name}.json", generic)
    store.put_json(
        f"{root}/temporal_understanding_pred.json",
        [{"video_name": "v_1", "Q": "What happens first?", "A": "He falls.", "pred": "He falls."}],
    )
    store.put_json(
        f"{root}/consistency_pred.json",
        [
            {
                "video_name": "v_1",
                "Q1": "What is he wearing?",
                "Q2": "What clothes does he have on?",
                "A": "A red coat.",
                "pred1": "A red coat.",
                "pred2": "A blue coat.",
            }
        ],
    )


SCORES = {"factual accuracy": 4, "detail orientation": 3, "contextual understanding": 5}


def judge_reply(body: dict, seen: Counter) -> str:
    """Scores by criterion; "chatty" predictions get text around the dict (never read officially)."""
    user = body["messages"][-1]["content"]
    name = re.search(r"only as a (.+?) score where", user).group(1)
    if "chatty" in user:
        return "Sure! {'score': 1}"
    if name == "temporal accuracy":
        return "{'pred': 'yes', 'score': 6}"  # out of range: counted as the scripts count it
    if name == "consistency":
        return "{'score': 2.9}"
    return f"{{'score': {SCORES[name]}}}"


def grade_all(store, prefix: str, **judge_kwargs):
    bench = BENCHMARKS["video_chatgpt"]
    loaded = bench.load(Location(StoreSource(store), prefix), None, max_items=0)
    with FakeOpenAI(judge_reply) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0)
        judge = Judge(client, "judge", max_attempts=2, **judge_kwargs)
        graded = [bench.grade(i, {k: i.data[k] for k in ("pred", "pred1", "pred2") if k in i.data}, judge)
                  for i in loaded.items]  # fmt: skip
        requests = list(fake.requests)
    return loaded, graded, requests


def test_five_file_layout_judged_as_the_scripts(tmp_path) -> None:
    store = make_store(tmp_path)
    write_five_files(store)
    loaded, graded, requests = grade_all(store, "vcgpt_preds")
    assert loaded.errors == []  # predictions: no video needed
    by_file = Counter()
    criteria_of = {}
    for item, g in zip(loaded.items, graded, strict=True):
        stem = item.item_id.split("/")[0]
        by_file[stem] += g.judge_calls
        criteria_of.setdefault(stem, set()).update(g.scores)
    # Each generic file is judged on its own criterion only: 2 judgments per file (2 items), not 6.
    assert criteria_of == {
        "correctness_pred": {"correctness"},
        "detailed_orientation_pred": {"detail_orientation"},
        "contextual_pred": {"contextual_understanding"},
        "temporal_understanding_pred": {"temporal_understanding"},
        "consistency_pred": {"consistency"},
    }
    # The "chatty" item is asked twice (max_attempts) in each generic file.
    assert by_file == {
        "correctness_pred": 2,
        "detailed_orientation_pred": 2,
        "contextual_pred": 2,
        "temporal_understanding_pred": 1,
        "consistency_pred": 1,
    }
    assert len(requests) == 3 * 3 + 1 + 1
    rows = {r.task: r for r in BENCHMARKS["video_chatgpt"].summarize(graded)}
    # The mean over the judged items; the unread one is a failure, not a score.
    assert (rows["correctness"].score, rows["correctness"].items, rows["correctness"].failures) == (4.0, 2, 1)
    assert rows["detail_orientation"].score == 3.0
    assert rows["contextual_understanding"].score == 5.0
    assert rows["temporal_understanding"].score == 6.0  # {'score': 6} counts 6
    assert rows["consistency"].score == 2.0  # int(2.9)
    assert rows["mean"].score == pytest.approx((4 + 3 + 5 + 6 + 2) / 5)
    assert all("lenient_score" not in r.extra for r in rows.values())


def test_lenient_judge_replies_are_a_separate_reading(tmp_path) -> None:
    store = make_store(tmp_path)
    write_five_files(store)
    _, graded, _ = grade_all(store, "vcgpt_preds", lenient=True)
    rows = {r.task: r for r in BENCHMARKS["video_chatgpt"].summarize(graded)}
    assert rows["correctness"].score == 4.0  # the official mean is unchanged
    assert rows["correctness"].extra["lenient_score"] == pytest.approx((4 + 1) / 2)


def test_question_file_answers_get_the_three_generic_criteria(tmp_path) -> None:
    store = make_store(tmp_path)
    store.put_json(
        "vcgpt/generic_qa.json",
        [{"video_name": "v_1", "Q": "What is the man doing?", "A": "He is skating.", "pred": "He skates."}],
    )
    _, graded, requests = grade_all(store, "vcgpt")
    assert set(graded[0].scores) == {"correctness", "detail_orientation", "contextual_understanding"}
    assert len(requests) == 3
