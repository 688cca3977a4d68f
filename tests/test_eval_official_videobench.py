"""Video-Bench's official scoring, answer style by answer style, and its files as they ship.

Expected outcomes are what PKU-YuanGroup/Video-Bench's code gives, worked out from it by hand: README.md
Step 1 (the question with its options, branch per number of choices; ``dataset_qajson`` reads only
``<Dataset>_QA_new.json``), Step2_chatgpt_judge.py (``process_file`` sends every output to the judge, with
no rule before it; ``chat_classify``: system / assistant / user messages; ``json.loads(reply)["maximum
probability"]`` must be one of A-F, else nothing is saved and the item is asked again on the next run),
Step3_compute_scores.py of the 2023 release (accuracy per dataset, level weights, final = mean of the
three levels), and today's scorer, the leaderboard Space (Hugging Face LanguageBind/Video-Bench,
``src/compute.py``, ``chatgpt_json``): ``output_chatgpt_choice == ANSWER[dataset][qid]['answer']`` with
``ANSWER`` read from its ``file/ANSWER.json``. The letter-only rule (``rule_letter``) is ours and only
feeds the "(lenient)" column (``evaluator.lenient_letter_replies``).
"""

# The official texts are kept verbatim, so some lines run long.
# ruff: noqa: E501

from __future__ import annotations

from collections import Counter

import openai
import pytest
from test_eval_support import BLUE, RED, FakeOpenAI, make_store, mp4_bytes

from dreamframe.config import get_settings
from dreamframe.errors import DreamFrameError, InvalidArgument
from services.evaluator import cli
from services.evaluator.benchmarks import BENCHMARKS
from services.evaluator.benchmarks.base import Graded, Location
from services.evaluator.benchmarks.videobench import rule_letter
from services.evaluator.evaluate import Evaluator
from services.evaluator.items import Item
from services.evaluator.judge import Judge, videobench_choice_reply
from services.evaluator.planning import load_benchmark
from services.evaluator.prompts import videobench_choice_messages, videobench_prompt
from services.evaluator.request import BenchmarkSpec, EndpointSpec, EvaluateRequest, EvaluateResult, ModelSpec
from services.evaluator.settings import EndpointEntry, EvaluatorSettings
from services.evaluator.sources import StoreSource
from services.evaluator.validation import validate

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

# Answer styles: (model output, the letter our lenient rule reads; None: the rule reads none). Officially
# (Step 2's process_file) every one of them goes to the judge as it is, with no rule before it.
ANSWER_STYLES = [
    ("B", "B"),  # the bare letter
    ("(B)", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("  C  ", "C"),
    ("C. blue", "C"),  # letter + exactly its choice's text
    ("B. A woman slips on the ice", "B"),
    ("A woman slips on the ice", None),  # option B's text starting with "A ": not letter A
    ("A man slips on the ice", None),  # choice text without the letter
    ("C. green", None),  # letter + another text: contradictory
    ("Option B", None),
    ("The answer is B.", None),
    ("b", None),  # lower case: not a letter of the choices
    ("E", None),  # not one of this item's letters
    ("B\nBecause she slips.", None),  # multi-line
    ("2", None),  # a number
    ("", None),  # empty: Step 2 still asks the judge (target sequence '')
    ("I cannot tell from the video.", None),  # a refusal
]


@pytest.mark.parametrize(("output", "expected"), ANSWER_STYLES)
def test_lenient_rule_reads_only_unambiguous_letters(output: str, expected: str | None) -> None:
    assert rule_letter(output, CHOICES) == expected


def test_lenient_rule_with_one_choice() -> None:
    assert rule_letter("A", {"A": "balance beam"}) == "A"
    assert rule_letter("balance beam", {"A": "balance beam"}) is None


def _judge_says(letter: str):
    def reply(body: dict, seen: Counter) -> str:
        return f'{{"maximum probability":"{letter}"}}'

    return reply


def test_every_answer_style_goes_to_the_judge_and_its_letter_is_the_official_one() -> None:
    """Step 2 judges every output, so the official letter is the judge's even for "B" (the judge here
    always says D; the answer is B). The lenient rule changes only the "(lenient)" reading."""
    item = Item(
        "video_bench", "TVQA", "TVQA/0", None, {"question": "Who slips?", "choices": CHOICES, "answer": "B"}
    )
    prompt = videobench_prompt("Who slips?", CHOICES)
    official = BENCHMARKS["video_bench"]
    lenient = official.for_settings(EvaluatorSettings(lenient_letter_replies=True))
    assert official.lenient_letters is False and lenient.lenient_letters is True
    with FakeOpenAI(_judge_says("D")) as fake:
        judge = Judge(
            openai.OpenAI(base_url=fake.base_url, api_key="t", max_retries=0), "judge", max_attempts=1
        )
        for output, rule in ANSWER_STYLES:
            g = official.grade(item, {"output": output}, judge)
            assert (g.detail["pred"], g.detail["matched_by"], g.judge_calls) == ("D", "judge", 1), output
            assert (g.correct, g.failures, g.lenient) == (False, 0, None), output
            assert fake.requests[-1]["messages"] == videobench_choice_messages(prompt, output)
            g = lenient.grade(item, {"output": output}, judge)
            assert (g.detail["pred"], g.correct, g.judge_calls) == ("D", False, 1), output  # unchanged
            assert g.detail["lenient_pred"] == (rule or "D"), output
            assert g.lenient is (rule == "B"), output
        assert len(fake.requests) == 2 * len(ANSWER_STYLES)


def test_without_a_judge_nothing_is_scored_and_a_request_is_refused() -> None:
    item = Item("video_bench", "TVQA", "TVQA/0", None, {"question": "Q?", "choices": CHOICES, "answer": "B"})
    g = BENCHMARKS["video_bench"].grade(item, {"output": "B"}, None)
    assert (g.correct, g.failures, g.judge_calls, g.detail["pred"]) == (False, 1, 0, None)
    assert BENCHMARKS["video_bench"].requires_judge
    request = EvaluateRequest(
        "vb",
        models=(ModelSpec(name="m", preset="tiny"),),
        benchmarks=(BenchmarkSpec("video_bench", data_prefix="Video-Bench/Eval_QA"),),
    )
    with pytest.raises(InvalidArgument) as caught:
        validate(request, EvaluatorSettings())
    assert caught.value.field == "judge"


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


# The leaderboard's answer file, as src/compute.py reads it: {dataset: {qid: {"answer": letter}}}, the
# dataset named as Step 1 names it, the qid as the Eval_QA file's key.
TODAYS_ANSWERS = {
    "ActivityNet": {"v_red_4": {"answer": "A"}, "v_red_5": {"answer": "A"}, "v_red_6": {"answer": "B"}},
    "MOT": {"0": {"answer": "F"}},
}


def write_today(
    store,
    root: str = "Video-Bench",
    *,
    answers: dict | None = TODAYS_ANSWERS,
    place: str = "file/ANSWER.json",
) -> None:
    """Today's layout: public Eval_QA files without answers (ActivityNet's items carry a ``qid`` field, as
    in the repository), the legacy MOT_QA.json beside MOT_QA_new.json (with answers and absolute paths, as
    in the repository), and the leaderboard's answer file at ``place`` under the Video-Bench root."""
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
    if answers is not None:
        store.put_json(f"{root}/{place}", answers)


def scripted(body: dict, seen: Counter) -> str:
    """The judge maps by the target sequence: a bare letter to itself, "woman" to B, "I see red" with text
    around the dict (never read officially), anything else to A."""
    text = "\n".join(m["content"] for m in body["messages"] if isinstance(m["content"], str))
    target = text.split("'target sequcene': '", 1)[1].split("'", 1)[0]
    if target in tuple("ABCDEF"):
        return f'{{"maximum probability":"{target}"}}'
    if "woman" in target:
        return '{"maximum probability":"B"}'
    if "I see red" in target:
        return 'Sure! {"maximum probability":"A"}'
    return '{"maximum probability":"A"}'


def grade_all(store, prefix: str, outputs: dict[str, str], *, lenient_letters: bool = False, **judge_kwargs):
    bench = BENCHMARKS["video_bench"].for_settings(EvaluatorSettings(lenient_letter_replies=lenient_letters))
    loaded = bench.load(Location(StoreSource(store), prefix), None, max_items=0)
    with FakeOpenAI(scripted) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0)
        judge = Judge(client, "judge", max_attempts=2, **judge_kwargs)
        graded = {i.item_id: bench.grade(i, {"output": outputs[i.item_id]}, judge) for i in loaded.items}
        requests = fake.requests
    return loaded, graded, requests


OUTPUTS = {
    "ActivityNet/v_red_4": "I see red",  # judge replies with text around the dict: never read officially
    "ActivityNet/v_red_5": "A",  # the one-choice item, counted; judged like every other
    "ActivityNet/v_red_6": "A woman slips on the ice",  # the judge says B
    "MOT/0": "F",
}


@pytest.mark.parametrize("place", ["file/ANSWER.json", "answer/ANSWER.json", "Eval_QA/ANSWER.json"])
def test_todays_layout_reads_the_leaderboards_answer_file_and_skips_the_legacy_file(tmp_path, place) -> None:
    store = make_store(tmp_path)
    write_today(store, place=place)
    loaded, graded, requests = grade_all(store, "Video-Bench/Eval_QA", OUTPUTS)
    assert sorted(i.item_id for i in loaded.items) == sorted(OUTPUTS)  # one MOT, not two
    assert {i.item_id: i.data["answer"] for i in loaded.items} == {
        "ActivityNet/v_red_4": "A", "ActivityNet/v_red_5": "A", "ActivityNet/v_red_6": "B", "MOT/0": "F"
    }  # fmt: skip
    assert loaded.files == [
        "Video-Bench/Eval_QA/ActivityNet_QA_new.json",
        "Video-Bench/Eval_QA/MOT_QA_new.json",
    ]
    assert [e.item_id for e in loaded.errors] == ["Video-Bench/Eval_QA/MOT_QA.json"]
    assert "legacy" in loaded.errors[0].reason
    # Every output went to the judge, the bare letters too.
    assert all(g.detail["matched_by"] == "judge" for k, g in graded.items() if k != "ActivityNet/v_red_4")
    assert graded["ActivityNet/v_red_5"].correct and graded["ActivityNet/v_red_5"].judge_calls == 1
    assert graded["ActivityNet/v_red_6"].correct and graded["MOT/0"].correct
    # Asked twice (max_attempts), never read: wrong and a failure.
    red = graded["ActivityNet/v_red_4"]
    assert (red.correct, red.failures, red.judge_calls) == (False, 1, 1)
    assert len(requests) == 2 + 3
    assert all([m["role"] for m in r["messages"]] == ["system", "assistant", "user"] for r in requests)
    rows = {r.task: r for r in BENCHMARKS["video_bench"].summarize(list(graded.values()))}
    assert rows["ActivityNet"].score == pytest.approx(200 / 3)
    assert rows["MOT"].score == 100.0
    assert "lenient_score" not in rows["ActivityNet"].extra  # no lenient reading asked for


def test_answer_file_values_must_have_the_leaderboards_shape(tmp_path) -> None:
    """src/compute.py reads ANSWER[dataset][qid]['answer']: a bare letter there is not that layout."""
    store = make_store(tmp_path)
    answers = {"ActivityNet": {"v_red_4": "A", "v_red_5": {"answer": "A"}}, "MOT": ["F"]}
    write_today(store, answers=answers)
    loaded = BENCHMARKS["video_bench"].load(
        Location(StoreSource(store), "Video-Bench/Eval_QA"), None, max_items=0
    )
    assert [i.item_id for i in loaded.items] == ["ActivityNet/v_red_5"]
    reasons = {e.item_id: e.reason for e in loaded.errors}
    assert reasons["ActivityNet/v_red_4"] == (
        "Video-Bench/file/ANSWER.json: expected {'answer': letter} for this qid, got 'A'"
    )
    assert reasons["ActivityNet/v_red_6"] == "missing answer"  # not in the file, none in the item
    assert "'MOT' is not {qid: {'answer': letter}}" in reasons["Video-Bench/file/ANSWER.json"]
    assert "MOT_QA_new.json has no answers" in reasons["Video-Bench/Eval_QA/MOT_QA_new.json"]


def test_lenient_options_are_separate_readings(tmp_path) -> None:
    store = make_store(tmp_path)
    write_today(store)
    _, graded, _ = grade_all(store, "Video-Bench/Eval_QA", OUTPUTS, lenient=True)
    red = graded["ActivityNet/v_red_4"]
    assert red.correct is False and red.lenient is True  # the official score is unchanged
    rows = {r.task: r for r in BENCHMARKS["video_bench"].summarize(list(graded.values()))}
    assert rows["ActivityNet"].score == pytest.approx(200 / 3)
    assert rows["ActivityNet"].extra["lenient_score"] == 100.0
    # The letter rule alone: "A" and "F" are read without the judge in the lenient column only.
    _, graded, requests = grade_all(store, "Video-Bench/Eval_QA", OUTPUTS, lenient_letters=True)
    assert len(requests) == 2 + 3  # the judge is still asked about every output
    assert graded["MOT/0"].detail["lenient_matched_by"] == "rule" and graded["MOT/0"].lenient is True
    assert graded["ActivityNet/v_red_4"].lenient is False  # no letter, and the judge's reply is unread


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
    write_today(store, answers=None)
    loaded = BENCHMARKS["video_bench"].load(
        Location(StoreSource(store), "Video-Bench/Eval_QA"), None, max_items=0
    )
    assert loaded.items == [] and loaded.files == []
    reasons = {e.item_id: e.reason for e in loaded.errors}
    assert "ActivityNet_QA_new.json has no answers" in reasons["Video-Bench/Eval_QA/ActivityNet_QA_new.json"]
    assert "file/ANSWER.json" in reasons["Video-Bench/Eval_QA/MOT_QA_new.json"]
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


# --- end to end: an endpoint's replies through Evaluate, with and without the lenient letter option -------
def model_and_judge(body: dict, seen: Counter) -> str:
    """The model under test says "A" to the one-choice question and "It is the man." to the others; the
    judge maps "A" to B (a judge can be wrong) and the rest as ``scripted``."""
    content = body["messages"][-1]["content"]
    if isinstance(content, list):  # the model: frames and the Step 1 prompt
        text = next(p["text"] for p in content if p.get("type") == "text")
        return "A" if text == "What is in front?" else "It is the man."
    if "'target sequcene': 'A'" in body["messages"][1]["content"]:
        return '{"maximum probability":"B"}'
    return scripted(body, seen)


@pytest.mark.parametrize("lenient_letters", [False, True])
def test_evaluate_judges_every_reply_and_reports_the_rule_only_as_lenient(tmp_path, lenient_letters) -> None:
    store = make_store(tmp_path)
    write_today(store)
    with FakeOpenAI(model_and_judge) as fake:
        settings = EvaluatorSettings(
            work_dir=tmp_path / "work",
            num_frames=2,
            endpoints={"vision": EndpointEntry(base_url=fake.base_url, model="m")},
            judges={"default": EndpointEntry(base_url=fake.base_url, model="judge")},
            lenient_letter_replies=lenient_letters,
        )
        request = EvaluateRequest(
            "vb",
            models=(ModelSpec(name="api", endpoint=EndpointSpec(name="vision")),),
            benchmarks=(BenchmarkSpec("video_bench", data_prefix="Video-Bench/Eval_QA"),),
        )
        results = [m for m in Evaluator(store, settings).evaluate(request) if isinstance(m, EvaluateResult)]
    report = results[0].report
    bench = report["benchmarks"][0]
    assert bench["judge_calls"]["api"] == 4  # every reply, "A" included
    assert report["options"]["lenient_letter_replies"] is lenient_letters
    anet = next(r for r in report["scores"] if r["task"] == "ActivityNet")
    # Officially "A" is what the judge made of it (B): wrong; "It is the man." → A: right for v_red_4 only.
    assert anet["score"] == pytest.approx(100 / 3)
    md = store.get_bytes(results[0].report_markdown.key).decode()
    if lenient_letters:
        assert anet["extra"]["lenient_score"] == pytest.approx(200 / 3)  # "A" read as A by the rule
        assert "| api (lenient) |" in md and "lenient_letter_replies" in md
    else:
        assert "lenient_score" not in anet.get("extra", {}) and "(lenient)" not in md


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
    write_today(env, answers=None)
    model = "m=endpoint:http://127.0.0.1:9/v1#vision"  # never called: the request is refused first
    judge = "http://127.0.0.1:9/v1#judge"  # a judge is required; never called either
    argv = [
        "--name",
        "vb",
        "--model",
        model,
        "--judge",
        judge,
        "--benchmark",
        "video_bench=Video-Bench/Eval_QA",
    ]
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "benchmarks[0].data_prefix" in out.err and "ActivityNet_QA_new.json has no answers" in out.err
    assert "Traceback" not in out.err


def test_cli_refuses_video_bench_without_a_judge(env, capsys) -> None:
    write_today(env)
    argv = ["--name", "vb", "--model", "m=endpoint:http://127.0.0.1:9/v1#vision",
            "--benchmark", "video_bench=Video-Bench/Eval_QA"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "judge" in err and "Traceback" not in err
