"""Video-Bench's official scoring, answer style by answer style, and its files as they ship.

Expected outcomes are what PKU-YuanGroup/Video-Bench's code gives, worked out from it by hand: README.md
Step 1 (the question with its options, branch per number of choices; ``dataset_qajson`` reads only
``<Dataset>_QA_new.json``), Step2_chatgpt_judge.py (``chat_classify``: system / assistant / user messages;
``process_file``: ``json.loads(reply)["maximum probability"]`` must be one of A-F, else nothing is saved
and the item is asked again on the next run) and Step3_compute_scores.py of the 2023 release (accuracy per
dataset, level weights, final = mean of the three levels). Step 2 sends every output to the judge; our
one rule takes only outputs that can mean nothing but one of the item's letters, so "None" below = the
judge decides, as in Step 2.
"""

# The official texts are kept verbatim, so some lines run long.
# ruff: noqa: E501

from __future__ import annotations

from collections import Counter

import openai
import pytest
from test_eval_support import BLUE, RED, FakeOpenAI, make_store, mp4_bytes

from dreamframe.config import get_settings
from dreamframe.errors import DreamFrameError
from services.evaluator import cli
from services.evaluator.benchmarks import BENCHMARKS
from services.evaluator.benchmarks.base import Graded, Location
from services.evaluator.benchmarks.videobench import rule_letter
from services.evaluator.judge import Judge, videobench_choice_reply
from services.evaluator.planning import load_benchmark
from services.evaluator.prompts import videobench_choice_messages, videobench_prompt
from services.evaluator.request import BenchmarkSpec
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.sources import StoreSource

SIX = {k: f"{n}" for k, n in zip("ABCDEF", (81, 37, 18, 100, 126, 63), strict=True)}


@pytest.mark.parametrize(
    ("choices", "expected"),
    [
        # One choice: no branch of Step 1 matches, the bare question is asked.
        ({"A": "balance beam"}, "Q?"),
        (
            {"A": "x", "B": "y"},
            "Q? A.x B.y \n Among the two options A, B above, the one closest to the correct answer is: ",
        ),
        (
            {"A": "x", "B": "y", "C": "z"},
            "Q? A.x B.y C.z \n Among the three options A, B, C above, the one closest to the correct answer is: ",
        ),
        # Four: the only short branch without the trailing space.
        (
            {"A": "red", "B": "blue", "C": "green", "D": "black"},
            "Q? A.red B.blue C.green D.black \n Among the four options A, B, C, D above, the one closest to the "
            "correct answer is:",
        ),
        (
            {"A": "1", "B": "2", "C": "3", "D": "4", "E": "5"},
            "Q? A.1 B.2 C.3 D.4 E.5 \n Among the five options A, B, C, D, E above, the one closest to the "
            "correct answer is: ",
        ),
        # Six: "Choices:" glued to the question (no space), no trailing space.
        (
            SIX,
            "Q?Choices: A.81 B.37 C.18 D.100 E.126 F.63 \n Among the six options A, B, C, D, E, F above, the one "
            "closest to the correct answer is:",
        ),
    ],
)
def test_prompt_is_step1_verbatim(choices: dict, expected: str) -> None:
    assert videobench_prompt("Q?", choices) == expected


def test_judge_messages_have_step2_roles_and_text() -> None:
    messages = videobench_choice_messages("Q? A.x B.y \n Among ...", "It is y.")
    assert [m["role"] for m in messages] == ["system", "assistant", "user"]
    assert messages[0]["content"] == "As a language expert, please complete the following task."
    assert messages[1]["content"] == (
        "You are now an answer selection expert, and I will provide you with a question with several options, "
        "as well as a target sentence. Please return the alphabet of the option with the highest probability of "
        "matching this target sentence. Given question with options and the target sequence:\n"
        "{'target sequcene': 'It is y.', 'question': 'Q? A.x B.y \\n Among ...'}"
    )
    assert messages[2]["content"] == (
        'Please output your responses in the form of a dictionary {"maximum probability":"xxx"}  '
        "where xxx is A or B or C or ..."
    )


CHOICES = {"A": "A man slips on the ice", "B": "A woman slips on the ice", "C": "blue", "D": "Nobody"}


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "B"),  # the bare letter: the judge can only map it to B
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("  C  ", "C"),
        ("C. blue", "C"),  # letter + exactly its choice's text
        ("B. A woman slips on the ice", "B"),
        ("A woman slips on the ice", None),  # option B's text starting with "A ": the judge's, not letter A
        ("A man slips on the ice", None),  # choice text without the letter: the judge maps it (Step 2)
        ("C. green", None),  # letter + another text: contradictory, the judge's
        ("Option B", None),
        ("The answer is B.", None),
        ("b", None),  # lower case: not a letter of the choices
        ("E", None),  # not one of this item's letters
        ("B\nBecause she slips.", None),  # multi-line
        ("2", None),  # a number
        ("", None),  # empty: Step 2 still asks the judge (target sequence '')
        ("I cannot tell from the video.", None),  # a refusal
    ],
)
def test_rule_step_takes_only_unambiguous_letters(output: str, expected: str | None) -> None:
    assert rule_letter(output, CHOICES) == expected


def test_rule_step_with_one_choice() -> None:
    assert rule_letter("A", {"A": "balance beam"}) == "A"
    assert rule_letter("balance beam", {"A": "balance beam"}) is None  # the judge's


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"maximum probability":"B"}', "B"),
        ('{"maximum probability": "B"}', "B"),
        ('  {"maximum probability":"F"}\n', "F"),  # json.loads ignores surrounding whitespace
        ('{"maximum probability":"E"}', "E"),  # in A-F: accepted (wrong for a four-choice item)
        ("{'maximum probability': 'B'}", None),  # Python quotes: json.loads raises, asked again
        ('The answer is {"maximum probability":"B"}', None),  # text around: json.loads raises
        ('{"maximum probability":"(B)"}', None),  # not in ['A'..'F']: KeyError raised there
        ('{"maximum probability":"b"}', None),
        ('{"maximum probability":"G"}', None),
        ('{"Maximum probability":"B"}', None),  # KeyError
        ('["B"]', None),  # not a dict
        ("B", None),
        ("", None),
    ],
)
def test_judge_reply_read_as_step2(reply: str, expected: str | None) -> None:
    assert videobench_choice_reply(reply) == expected


def test_levels_follow_step3_weights() -> None:
    graded = [Graded("MSVD", True), Graded("MOT", False), Graded("TVQA", True), Graded("Driving-exam", False)]
    rows = {r.task: r for r in BENCHMARKS["video_bench"].summarize(graded)}
    # MSVD 100 (w 1), MOT 0 (w 0.5) → 100 / 1.5; TVQA 100; Driving-exam 0 → 0.
    assert rows["level/Video-Exclusive Understanding"].score == pytest.approx(100 / 1.5)
    assert rows["level/Prior Knowledge-based QA"].score == 100.0
    assert rows["level/Comprehension and Decision-making"].score == 0.0
    assert rows["final"].score == pytest.approx((100 / 1.5 + 100 + 0) / 3)


# --- the files as they ship -------------------------------------------------------------------------------
def _item(vid: str, question: str, choices: dict, **extra) -> dict:
    return {"vid_path": f"Eval_video/{vid}", "video_id": vid.split("/")[-1][:-4], "question": question,
            "choices": choices, **extra}  # fmt: skip


def write_today(store, root: str = "Video-Bench", *, with_answers: bool = True) -> None:
    """Today's layout: public Eval_QA files without answers, the legacy MOT_QA.json beside MOT_QA_new.json
    (with answers and absolute paths, as in the repository), answers in answer/ANSWER.json."""
    store.put_bytes(f"{root}/Eval_video/ActivityNet/v_red.mp4", mp4_bytes([RED] * 6))
    store.put_bytes(f"{root}/Eval_video/MOT/MOT16-02.mp4", mp4_bytes([BLUE] * 6))
    colours = {"A": "red", "B": "blue", "C": "green", "D": "black"}
    store.put_json(
        f"{root}/Eval_QA/ActivityNet_QA_new.json",
        {
            "v_red_4": _item("ActivityNet/v_red.mp4", "What colour is it?", colours, qid="v_red_4"),
            "v_red_5": _item("ActivityNet/v_red.mp4", "What is in front?", {"A": "red"}, qid="v_red_5"),
            "v_red_6": _item("ActivityNet/v_red.mp4", "Who slips?", CHOICES, qid="v_red_6"),
        },
    )
    store.put_json(
        f"{root}/Eval_QA/MOT_QA_new.json",
        {"0": _item("MOT/MOT16-02.mp4", "How many distinct pedestrians are visible in the video?", SIX)},
    )
    store.put_json(
        f"{root}/Eval_QA/MOT_QA.json",
        {"0": {**_item("MOT/MOT16-02.mp4", "How many?", SIX), "answer": "F",
               "vid_path": "/remote-home/share/VideoBenchmark/videos/MOT_video/MOT16_videos/MOT16-02.mp4"}},
    )  # fmt: skip
    if with_answers:
        store.put_json(
            f"{root}/answer/ANSWER.json",
            {
                "ActivityNet": {"v_red_4": "A", "v_red_5": {"answer": "A"}, "v_red_6": "B"},
                "MOT": {"0": "F"},
            },
        )


def scripted(body: dict, seen: Counter) -> str:
    """The model says a colour, a letter or a sentence; the judge maps by the target sequence."""
    messages = body["messages"]
    text = "\n".join(m["content"] if isinstance(m["content"], str) else "" for m in messages)
    if "maximum probability" in text:
        target = text.split("'target sequcene': ", 1)[1]
        if "woman" in target:
            return '{"maximum probability":"B"}'
        if "I see red" in target:
            return 'Sure! {"maximum probability":"A"}'  # text around: not what Step 2 reads
        return '{"maximum probability":"A"}'
    return "unused"


def grade_all(store, prefix: str, outputs: dict[str, str], **judge_kwargs):
    bench = BENCHMARKS["video_bench"]
    loaded = bench.load(Location(StoreSource(store), prefix), None, max_items=0)
    with FakeOpenAI(scripted) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0)
        judge = Judge(client, "judge", max_attempts=2, **judge_kwargs)
        graded = {i.item_id: bench.grade(i, {"output": outputs[i.item_id]}, judge) for i in loaded.items}
        requests = fake.requests
    return loaded, graded, requests


OUTPUTS = {
    "ActivityNet/v_red_4": "I see red",  # judge replies with text around the dict: never read officially
    "ActivityNet/v_red_5": "A",  # the one-choice item, counted
    "ActivityNet/v_red_6": "A woman slips on the ice",  # goes to the judge, which says B
    "MOT/0": "F",
}


def test_todays_layout_reads_answer_json_and_skips_the_legacy_file(tmp_path) -> None:
    store = make_store(tmp_path)
    write_today(store)
    loaded, graded, requests = grade_all(store, "Video-Bench/Eval_QA", OUTPUTS)
    assert sorted(i.item_id for i in loaded.items) == sorted(OUTPUTS)  # one MOT, not two
    assert loaded.files == [
        "Video-Bench/Eval_QA/ActivityNet_QA_new.json",
        "Video-Bench/Eval_QA/MOT_QA_new.json",
    ]
    assert [e.item_id for e in loaded.errors] == ["Video-Bench/Eval_QA/MOT_QA.json"]
    assert "legacy" in loaded.errors[0].reason
    assert graded["ActivityNet/v_red_5"].correct and graded["ActivityNet/v_red_5"].judge_calls == 0
    assert (
        graded["ActivityNet/v_red_6"].correct
        and graded["ActivityNet/v_red_6"].detail["matched_by"] == "judge"
    )
    assert graded["MOT/0"].correct and graded["MOT/0"].detail["matched_by"] == "rule"
    # Asked twice (max_attempts), never read: wrong and a failure.
    red = graded["ActivityNet/v_red_4"]
    assert (red.correct, red.failures, red.judge_calls) == (False, 1, 1)
    assert len(requests) == 3
    assert all([m["role"] for m in r["messages"]] == ["system", "assistant", "user"] for r in requests)
    rows = {r.task: r for r in BENCHMARKS["video_bench"].summarize(list(graded.values()))}
    assert rows["ActivityNet"].score == pytest.approx(200 / 3)
    assert rows["MOT"].score == 100.0
    assert "lenient_score" not in rows["ActivityNet"].extra  # the option is off


def test_lenient_judge_replies_are_a_separate_reading(tmp_path) -> None:
    store = make_store(tmp_path)
    write_today(store)
    _, graded, _ = grade_all(store, "Video-Bench/Eval_QA", OUTPUTS, lenient=True)
    red = graded["ActivityNet/v_red_4"]
    assert red.correct is False and red.lenient is True  # the official score is unchanged
    rows = {r.task: r for r in BENCHMARKS["video_bench"].summarize(list(graded.values()))}
    assert rows["ActivityNet"].score == pytest.approx(200 / 3)
    assert rows["ActivityNet"].extra["lenient_score"] == 100.0


def test_2023_release_answers_in_the_items(tmp_path) -> None:
    store = make_store(tmp_path)
    store.put_bytes("VB/Eval_video/TVQA/s1.mp4", mp4_bytes([BLUE] * 6))
    store.put_json(
        "VB/Eval_QA/TVQA_QA_new.json",
        {"s1_0": _item("TVQA/s1.mp4", "Which colour?", {"A": "red", "B": "blue"}, answer="B")},
    )
    loaded = BENCHMARKS["video_bench"].load(Location(StoreSource(store), "VB/Eval_QA"), None, max_items=0)
    assert [(i.item_id, i.data["answer"]) for i in loaded.items] == [("TVQA/s1_0", "B")]
    assert loaded.errors == []


def test_files_without_answers_are_refused_naming_the_file(tmp_path) -> None:
    store = make_store(tmp_path)
    write_today(store, with_answers=False)
    loaded = BENCHMARKS["video_bench"].load(
        Location(StoreSource(store), "Video-Bench/Eval_QA"), None, max_items=0
    )
    assert loaded.items == [] and loaded.files == []
    reasons = {e.item_id: e.reason for e in loaded.errors}
    assert "ActivityNet_QA_new.json has no answers" in reasons["Video-Bench/Eval_QA/ActivityNet_QA_new.json"]
    assert "answer/ANSWER.json" in reasons["Video-Bench/Eval_QA/MOT_QA_new.json"]
    settings = EvaluatorSettings(work_dir=tmp_path / "work")
    with pytest.raises(DreamFrameError) as caught:
        load_benchmark(0, BenchmarkSpec("video_bench", data_prefix="Video-Bench/Eval_QA"), store, settings)
    assert caught.value.field == "benchmarks[0].data_prefix"
    assert "ActivityNet_QA_new.json has no answers" in caught.value.message


def test_some_items_scorable_but_none_loaded_is_a_failed_precondition(tmp_path) -> None:
    store = make_store(tmp_path)
    store.put_json(
        "VB/Eval_QA/TVQA_QA_new.json",
        {"s1_0": _item("TVQA/missing.mp4", "Which colour?", {"A": "red", "B": "blue"}, answer="B")},
    )
    settings = EvaluatorSettings(work_dir=tmp_path / "work")
    with pytest.raises(DreamFrameError) as caught:
        load_benchmark(0, BenchmarkSpec("video_bench", data_prefix="VB/Eval_QA"), store, settings)
    assert type(caught.value).__name__ == "FailedPrecondition"
    assert caught.value.field == "benchmarks[0].data_prefix"
    assert "not found" in caught.value.message


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMFRAME_STORAGE__ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("DREAMFRAME_STORAGE__BUCKET", "dreamframe")
    monkeypatch.setenv("DREAMFRAME_EVALUATOR__WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("DREAMFRAME_MODELS__CACHE_DIR", str(tmp_path / "models"))
    get_settings.cache_clear()
    yield make_store(tmp_path)
    get_settings.cache_clear()


def test_cli_exits_non_zero_on_files_without_answers(env, capsys) -> None:
    write_today(env, with_answers=False)
    model = "m=endpoint:http://127.0.0.1:9/v1#vision"  # never called: the request is refused first
    argv = ["--name", "vb", "--model", model, "--benchmark", "video_bench=Video-Bench/Eval_QA"]
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "benchmarks[0].data_prefix" in out.err and "ActivityNet_QA_new.json has no answers" in out.err
    assert "Traceback" not in out.err
