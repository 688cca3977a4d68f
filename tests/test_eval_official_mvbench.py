"""MVBench's official answer check, answer style by answer style, and the same rule on the project's own
multiple choice (mc/*.json).

The expected outcomes are what MVBench's notebook (OpenGVLab/Ask-Anything, video_chat2/mvbench.ipynb)
gives, worked out by hand from its code: the answer turn is pre-filled with "Best option:(", ``answer()``
cuts the generation at "###" and after the last "Assistant:", ``infer_mvbench`` keeps the first line of
``.strip()`` and puts "(" back in front (return_prompt), and ``check_ans(pred, gt)`` with gt "(B) <text>"
compares the first space-separated words, lower-cased: ``pred_option.replace('.', '') in gt_option or
gt_option in pred_option``. The lenient column is our own reading (``extract.mvbench_letter``).
"""

from __future__ import annotations

import pytest
from test_eval_support import BLUE, RED, FakeOpenAI, make_store, mp4_bytes

from dreamframe.models.video_llm import TINY_IMAGE_SIZE, TINY_PATCH_SIZE
from services.evaluator import extract as ex
from services.evaluator.benchmarks import BENCHMARKS
from services.evaluator.benchmarks.base import LENIENT_SCORE, Location
from services.evaluator.evaluate import Evaluator
from services.evaluator.items import Item
from services.evaluator.models import Choice
from services.evaluator.report import BenchmarkRun, ModelRun, build_report, render_markdown, write_report
from services.evaluator.request import BenchmarkSpec, EndpointSpec, EvaluateRequest, EvaluateResult, ModelSpec
from services.evaluator.settings import EndpointEntry, EvaluatorSettings
from services.evaluator.sources import StoreSource

# Option B, the right one, is a text that begins with "A ".
CANDIDATES = ["A man slips on the ice", "A woman slips on the ice", "the woman waves", "nothing happens"]
RIGHT = 1  # "(B) A woman slips on the ice"

# (reply generated after "Best option:(", official outcome, lenient letter)
ANSWER_STYLES = [
    # "(B" → "(b" in "(b)"
    ("B", True, "B"),
    # "((B)" → "(b)" in "((b)"
    ("(B)", True, "B"),
    # "(B)" equals the truth's first word
    ("B)", True, "B"),
    ("B) A woman slips on the ice", True, "B"),
    ("(B) A woman slips on the ice", True, "B"),
    # "(b." without dots is "(b"
    ("B.", True, "B"),
    ("B. A woman slips on the ice", True, "B"),
    # lower-cased by check_ans
    ("b", True, "B"),
    ("(b)", True, "B"),
    # "(option": neither contains the other
    ("Option B", False, "B"),
    ("Option (B)", False, "B"),
    # "(best"
    ("Best option: (B) A woman slips on the ice", False, "B"),
    ("Best option:(B)", False, "B"),
    ("The answer is B", False, "B"),
    # "(a" is not in "(b)": option B's own text is read as A by the notebook, so it is wrong
    ("A woman slips on the ice", False, "B"),
    ("a woman slips on the ice.", False, "B"),
    # option A's text, option A, option C: wrong either way
    ("A man slips on the ice", False, "A"),
    ("A", False, "A"),
    ("(A) A man slips on the ice", False, "A"),
    ("C", False, "C"),
    # only the first line counts
    ("B\nBecause the woman falls down.", True, "B"),
    ("B)\n(A) is also possible", True, "B"),
    ("Because the woman falls down.\nB", False, None),
    # strip() first: leading blank lines are gone
    ("\n\nB", True, "B"),
    ("  B  ", True, "B"),
    # empty: "(" is inside "(b)", so the notebook counts it as right
    ("", True, None),
    ("   \n ", True, None),
    # refusals
    ("I'm sorry, I cannot answer that.", False, None),
    ("I cannot tell from the video.", False, None),
    # numbers: "(2" / "(1"
    ("2", False, None),
    ("1", False, None),
    # "(b:" and "(b," contain no "(b)" and are not inside it
    ("B:", False, "B"),
    ("B, the woman", False, "B"),
    # "((b": not inside "(b)", does not contain it
    ("(B", False, "B"),
    # the notebook's cuts: before "###", after the last "Assistant:"
    ("B) ###Human: next question", True, "B"),
    ("Assistant: B", True, None),
    # not an option of this item / a word starting with the letter
    ("E", False, None),
    ("Bananas", False, None),
]


@pytest.mark.parametrize(("reply", "official", "lenient"), ANSWER_STYLES)
def test_mvbench_official_outcome_per_answer_style(reply: str, official: bool, lenient: str | None) -> None:
    assert ex.mvbench_official_correct(reply, CANDIDATES, RIGHT) is official
    assert ex.mvbench_letter(reply, CANDIDATES) == lenient


@pytest.mark.parametrize(
    ("reply", "official"),
    [
        ("A", True),  # "(a" in "(a)"
        ("A man slips on the ice", True),  # the text starts with "A ": right by coincidence, as there
        ("A woman slips on the ice", True),  # option B's text, read as A by the notebook
        ("Also B", False),  # "(also"
        ("", True),  # empty is right for every truth
    ],
)
def test_mvbench_official_outcome_when_a_is_right(reply: str, official: bool) -> None:
    assert ex.mvbench_official_correct(reply, CANDIDATES, 0) is official


def test_check_ans_and_ground_truth_as_the_notebook_writes_them() -> None:
    assert ex.mvbench_gt(CANDIDATES, RIGHT) == "(B) A woman slips on the ice"
    assert ex.mvbench_pred("B) x\ny") == "(B) x"
    assert ex.mvbench_check_ans("(B) A woman", "(B) A woman slips on the ice.")
    assert ex.mvbench_check_ans("(", "(C) nothing")
    assert not ex.mvbench_check_ans("(c", "(B) x")


# --- real-format files: MVBench's json/<task>.json and video/<task folder>/ ------------------------------
def write_mvbench_files(store, root: str = "MVBench") -> None:
    """MVBench as the HF dataset OpenGVLab/MVBench ships it: json/<task>.json lists of {video, question,
    candidates, answer} (start/end in seconds for the bounded tasks), videos under video/<folder>/."""
    store.put_bytes(f"{root}/video/star/Charades_v1_480/6H78U.mp4", mp4_bytes([RED] * 8))
    store.put_bytes(f"{root}/video/perception/videos/video_10.mp4", mp4_bytes([BLUE] * 8))
    store.put_json(
        f"{root}/json/action_sequence.json",
        [
            {
                "video": "6H78U.mp4",
                "question": "What happened after the person took the food?",
                "candidates": [
                    "Ate the medicine.",
                    "Tidied up the blanket.",
                    "Put down the cup/glass/bottle.",
                ],
                "answer": "Ate the medicine.",
                "start": 11.1,
                "end": 19.6,
            },
            {
                "video": "6H78U.mp4",
                "question": "What happened before the person sat on the floor?",
                "candidates": CANDIDATES,
                "answer": CANDIDATES[RIGHT],
                "start": 0.0,
                "end": 1.5,
            },
        ],
    )
    store.put_json(
        f"{root}/json/object_shuffle.json",
        [
            {
                "video": "video_10.mp4",
                "question": "The person uses multiple similar objects to play an occlusion game. "
                "Where is the hidden object at the end of the game from the person's point of view?",
                "candidates": [
                    "Under the first object from the left.",
                    "Under the third object from the left.",
                    "Under the second object from the left.",
                ],
                "answer": "Under the second object from the left.",
            }
        ],
    )


def graded_replies(kind: str, store, data_prefix: str, replies: dict[str, str]):
    bench = BENCHMARKS[kind]
    loaded = bench.load(Location(StoreSource(store), data_prefix), None, max_items=0)
    assert not loaded.errors, loaded.errors
    graded = []
    for item in loaded.items:
        reply = replies[item.item_id]
        # What EndpointModel.choose returns for a generated reply.
        answers = Choice(ex.mvbench_letter(reply, item.data["candidates"]), reply, "generated").to_json()
        graded.append(bench.grade(item, answers, None))
    return loaded, graded, bench.summarize(graded)


def test_mvbench_files_scored_officially_with_a_lenient_column(tmp_path) -> None:
    store = make_store(tmp_path)
    write_mvbench_files(store)
    replies = {
        "action_sequence/0": "A) Ate the medicine.",  # right
        "action_sequence/1": "Option B",  # right by the lenient reading only
        "object_shuffle/0": "",  # right by the notebook only (empty reply)
    }
    loaded, graded, rows = graded_replies("mvbench", store, "MVBench/json", replies)
    item = {i.item_id: i for i in loaded.items}["action_sequence/1"]
    assert (item.visual.key, item.visual.start, item.visual.end) == (
        "MVBench/video/star/Charades_v1_480/6H78U.mp4",
        0.0,
        1.5,
    )
    outcome = {g.detail["gt_text"]: (g.correct, g.lenient, g.failures) for g in graded}
    assert outcome == {
        "(A) Ate the medicine.": (True, True, 0),
        "(B) A woman slips on the ice": (False, True, 0),
        "(C) Under the second object from the left.": (True, False, 0),
    }
    by_task = {r.task: r for r in rows}
    assert (
        by_task["Action Sequence"].score == 50.0 and by_task["Action Sequence"].extra[LENIENT_SCORE] == 100.0
    )
    assert by_task["Object Shuffle"].score == 100.0 and by_task["Object Shuffle"].extra[LENIENT_SCORE] == 0.0
    assert by_task["overall"].score == pytest.approx(200 / 3)


def test_letter_logits_are_scored_as_the_first_generated_token() -> None:
    store_item = BENCHMARKS["mvbench"]
    item = Item("mvbench", "t", "t/0", None, {"question": "q", "candidates": CANDIDATES, "answer": RIGHT})
    right = store_item.grade(item, {"letter": "B", "raw": "{}", "method": "letter_logits"}, None)
    wrong = store_item.grade(item, {"letter": "A", "raw": "{}", "method": "letter_logits"}, None)
    assert (right.correct, right.lenient, wrong.correct, wrong.lenient) == (True, True, False, False)


# --- the project's own multiple choice: the same rule ---------------------------------------------------
def test_dreamframe_mc_uses_the_mvbench_rule(tmp_path) -> None:
    store = make_store(tmp_path)
    root = "datasets/pier"
    store.put_bytes(f"{root}/videos/story_000.mp4", mp4_bytes([RED] * 8))
    items = [
        {
            "id": f"story_000_q{i}",
            "task": "tiny_story/what",
            "video": "videos/story_000.mp4",
            "question": "What happens at the pier?",
            "candidates": CANDIDATES,
            "answer": CANDIDATES[RIGHT],
        }
        for i in range(len(ANSWER_STYLES))
    ]
    store.put_json(f"{root}/mc/train.json", items[:1])
    store.put_json(f"{root}/mc/test.json", items)
    replies = {f"story_000_q{i}": reply for i, (reply, _, _) in enumerate(ANSWER_STYLES)}
    _, graded, rows = graded_replies("dreamframe_mc", store, f"{root}/", replies)
    assert [g.correct for g in graded] == [official for _, official, _ in ANSWER_STYLES]
    assert [g.lenient for g in graded] == [lenient == "B" for _, _, lenient in ANSWER_STYLES]
    overall = {r.task: r for r in rows}["overall"]
    assert overall.extra["correct"] == sum(official for _, official, _ in ANSWER_STYLES)


# --- the report: official score first, lenient column only when asked, random weights said first ---------
def _report(store, *, lenient: bool):
    write_mvbench_files(store)
    replies = {
        "action_sequence/0": "A) Ate the medicine.",
        "action_sequence/1": "Option B",
        "object_shuffle/0": "",
    }
    _, _, rows = graded_replies("mvbench", store, "MVBench/json", replies)
    bench = BenchmarkRun("mvbench", "mvbench", "MVBench/json", "", items=3)
    bench.scores = {"base": rows, "dreamframe": rows}
    models = [
        ModelRun("base", "preset:tiny:v1", {"preset": "tiny"}, 8),
        ModelRun("dreamframe", "checkpoint:runs/r1/final/@x", {"checkpoint_prefix": "runs/r1/final/"}, 8),
    ]
    return build_report(
        report_name="r",
        job_id="",
        created_at="2026-01-01T00:00:00+00:00",
        duration_seconds=1.0,
        models=models,
        benchmarks=[bench],
        judge=None,
        cache={},
        options={"lenient_answer_matching": lenient},
    )


def test_report_scores_officially_and_shows_lenient_only_when_asked(tmp_path) -> None:
    store = make_store(tmp_path)
    plain = _report(store, lenient=False)
    overall = next(r for r in plain["scores"] if r["task"] == "overall" and r["model"] == "base")
    assert overall["score"] == pytest.approx(200 / 3) and LENIENT_SCORE not in overall["extra"]
    assert "(lenient)" not in render_markdown(plain)

    asked = _report(store, lenient=True)
    overall = next(r for r in asked["scores"] if r["task"] == "overall" and r["model"] == "base")
    assert overall["score"] == pytest.approx(200 / 3)  # still the official score
    assert overall["extra"][LENIENT_SCORE] == pytest.approx(200 / 3)
    row = next(r for r in asked["benchmarks"][0]["comparison"] if r["task"] == "Action Sequence")
    assert row["scores"]["base"] == 50.0 and row["lenient"]["base"] == 100.0
    md = render_markdown(asked)
    assert "| base (lenient) | dreamframe (lenient) |" in md
    assert "| Action Sequence | 50.00 | 50.00 | +0.00 | 100.00 | 100.00 |" in md


def test_report_says_first_when_models_have_random_weights(tmp_path) -> None:
    store = make_store(tmp_path)
    report = _report(store, lenient=False)
    # Before the checkpoint's config is seen, only the preset is known to be random.
    assert len(report["notice"]) == 1 and "**base** is the tiny preset" in report["notice"][0]
    # The fine-tuned checkpoint has the tiny preset's architecture (as `make run` trains it).
    store.put_json(
        "runs/r1/final/config.json",
        {"vision_config": {"image_size": TINY_IMAGE_SIZE, "patch_size": TINY_PATCH_SIZE}, "text_config": {}},
    )
    refs = write_report(store, "reports/r/", report, [])
    written = store.get_json(refs.report_json.key)
    assert "**base**, **dreamframe** are the tiny preset" in written["notice"][0]
    md = store.get_bytes(refs.report_markdown.key).decode()
    lines = md.splitlines()
    assert lines[0] == "# Evaluation report: r" and lines[2].startswith("> **Random weights: **base**")
    assert md == render_markdown(written)
    # A real model and a real-size checkpoint: no notice.
    store.put_json("runs/r1/final/config.json", {"vision_config": {"image_size": 336, "patch_size": 14}})
    report["models"][0]["source"], report["models"][0]["identity"] = {"preset": "llava-1.5-7b"}, "preset:x"
    write_report(store, "reports/r2/", report, [])
    assert report["notice"] == []


# --- end to end: an endpoint model's replies through Evaluate, with and without the lenient option --------
def replies_by_question(body: dict, seen) -> str:
    """The model under test answers by the question: "Option A" for the first, "" for the second."""
    text = next(p["text"] for p in body["messages"][-1]["content"] if p.get("type") == "text")
    return "Option A" if "took the food" in text else ""


@pytest.mark.parametrize("lenient", [False, True])
def test_evaluate_scores_endpoint_replies_officially(tmp_path, lenient: bool) -> None:
    store = make_store(tmp_path)
    write_mvbench_files(store)
    store.delete("MVBench/json/object_shuffle.json")
    with FakeOpenAI(replies_by_question) as fake:
        settings = EvaluatorSettings(
            work_dir=tmp_path / "work",
            num_frames=2,
            endpoints={"vision": EndpointEntry(base_url=fake.base_url, model="m")},
            lenient_answer_matching=lenient,
        )
        request = EvaluateRequest(
            "official",
            models=(ModelSpec(name="api", endpoint=EndpointSpec(name="vision")),),
            benchmarks=(BenchmarkSpec("mvbench", data_prefix="MVBench/json"),),
        )
        results = [m for m in Evaluator(store, settings).evaluate(request) if isinstance(m, EvaluateResult)]
    report = results[0].report
    overall = next(r for r in report["scores"] if r["task"] == "overall")
    # "Option A" is wrong by check_ans ("(option"), the empty reply right ("(" is inside "(b)").
    assert overall["score"] == 50.0
    md = store.get_bytes(results[0].report_markdown.key).decode()
    assert report["notice"] == [] and "Random weights" not in md
    if lenient:
        assert overall["extra"][LENIENT_SCORE] == 50.0  # "Option A" read as A (right), "" names nothing
        assert "| api (lenient) |" in md
    else:
        assert LENIENT_SCORE not in overall["extra"] and "(lenient)" not in md
