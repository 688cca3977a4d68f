"""Benchmark loaders read each benchmark's own file format (written here into a LocalStore with tiny
videos); bad items become per-item errors; grading without a judge and the score arithmetic."""

from __future__ import annotations

import pytest
from test_eval_support import (
    make_store,
    write_dreamframe_mc,
    write_mvbench,
    write_tempcompass,
    write_videobench,
    write_videochatgpt,
)

from services.evaluator.benchmarks import BENCHMARKS
from services.evaluator.benchmarks.base import Graded, Location
from services.evaluator.sources import StoreSource


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path)


def load(store, kind: str, data_prefix: str, max_items: int = 0):
    return BENCHMARKS[kind].load(Location(StoreSource(store), data_prefix), None, max_items=max_items)


def by_id(loaded):
    return {item.item_id: item for item in loaded.items}


def test_mvbench_items_tasks_videos_and_errors(store) -> None:
    fixture = write_mvbench(store)
    loaded = load(store, "mvbench", fixture["data_prefix"])
    assert len(loaded.items) == fixture["items"]
    assert {i.task for i in loaded.items} == {"Action Sequence", "Moving Direction"}
    items = by_id(loaded)
    # Videos are found in MVBench's per-task folders under the sibling video/ folder.
    assert items["action_sequence/0"].visual.key == "bench/mvbench/video/star/Charades_v1_480/red.mp4"
    assert items["moving_direction/0"].visual.key == "bench/mvbench/video/clevrer/video_validation/blue.mp4"
    assert (items["action_sequence/1"].visual.start, items["action_sequence/1"].visual.end) == (1.1, 2.0)
    assert items["action_sequence/1"].data == {
        "question": "What colour fills the video?",
        "candidates": ["red", "blue"],
        "answer": 1,
    }
    reasons = {e.item_id: e.reason for e in loaded.errors}
    assert reasons == {
        "action_sequence/3": "video 'missing.mp4' not found",
        "moving_direction/1": "empty candidate list",
        "moving_direction/2": "answer 'blue' is not one of the candidates",
    }
    assert len(load(store, "mvbench", fixture["data_prefix"], max_items=1).items) == 2  # one per task


def test_mvbench_grading_reads_the_letter(store) -> None:
    item = load(store, "mvbench", write_mvbench(store)["data_prefix"]).items[0]
    bench = BENCHMARKS["mvbench"]
    assert bench.grade(item, {"letter": "A", "raw": "", "method": "x"}, None).correct is True
    wrong = bench.grade(item, {"letter": "B", "raw": "", "method": "x"}, None)
    assert wrong.correct is False and wrong.failures == 0
    unread = bench.grade(item, {"letter": None, "raw": "hmm", "method": "generated"}, None)
    assert unread.correct is False and unread.failures == 1


def test_tempcompass_items_and_rule_grading_without_judge(store) -> None:
    fixture = write_tempcompass(store)
    loaded = load(store, "tempcompass", fixture["data_prefix"])
    assert len(loaded.items) == fixture["items"]
    assert [e.item_id for e in loaded.errors] == ["multi-choice/v_gone/action/0"]
    items = by_id(loaded)
    cap = items["captioning/v_blue/speed/0"]
    assert cap.data["mc_question"].startswith("What colour is shown?") and cap.data["mc_answer"] == "B. blue"
    bench = BENCHMARKS["tempcompass"]
    mc = items["multi-choice/v_red/action/0"]
    assert bench.grade(mc, {"prediction": "A"}, None).correct is True
    undecided = bench.grade(mc, {"prediction": "It is reddish"}, None)
    assert undecided.correct is False and undecided.failures == 1 and undecided.detail["matched_by"] == "none"
    assert bench.grade(cap, {"prediction": "A blue video."}, None).failures == 1  # captioning needs the judge


def test_tempcompass_captioning_without_multi_choice_file_is_an_item_error(store) -> None:
    write_tempcompass(store)
    store.delete("bench/tempcompass/questions/multi-choice.json")
    loaded = load(store, "tempcompass", "bench/tempcompass/questions")
    assert "captioning/v_blue/speed/0" in {e.item_id for e in loaded.errors}
    assert all(i.data["qtype"] != "captioning" for i in loaded.items)


def test_videobench_items_and_answers(store) -> None:
    fixture = write_videobench(store)
    loaded = load(store, "video_bench", fixture["data_prefix"])
    assert len(loaded.items) == fixture["items"]
    items = by_id(loaded)
    assert items["MSVD/0"].visual.key == "bench/videobench/Eval_video/MSVD/red.mp4"
    assert items["TVQA/0"].data["answer"] == "B"  # given as the choice's text
    assert {e.item_id: e.reason for e in loaded.errors} == {
        "MSVD/1": "video 'Eval_video/MSVD/none.mp4' not found",
        "MOT/1": "empty candidate list",
    }
    bench = BENCHMARKS["video_bench"]
    # The official Step 2 sends every reply to the judge: without one even "B. blue" is not scored.
    for reply in ("B. blue", "Mostly a bluish colour"):
        graded = bench.grade(items["MOT/0"], {"output": reply}, None)
        assert graded.correct is False and graded.failures == 1


def test_videobench_levels_use_the_reference_weights() -> None:
    def grades(task: str, correct: int, total: int) -> list[Graded]:
        return [Graded(task, correct=i < correct) for i in range(total)]

    rows = BENCHMARKS["video_bench"].summarize(
        grades("MSVD", 1, 2) + grades("MOT", 1, 1) + grades("TVQA", 0, 2) + grades("Other", 2, 2)
    )
    score = {r.task: r.score for r in rows}
    assert score["MSVD"] == 50.0 and score["MOT"] == 100.0 and score["TVQA"] == 0.0
    # MSVD weight 1, MOT weight 0.5: (50 + 0.5 * 100) / 1.5
    assert score["level/Video-Exclusive Understanding"] == pytest.approx(100 / 1.5)
    assert score["level/Prior Knowledge-based QA"] == 0.0
    assert score["final"] == pytest.approx((100 / 1.5 + 0.0) / 2)
    assert score["overall"] == pytest.approx(100 * 4 / 7)  # every item, "Other" included
    assert "level/Comprehension and Decision-making" not in score


def test_videochatgpt_question_sets_and_predictions(store) -> None:
    fixture = write_videochatgpt(store)
    loaded = load(store, "video_chatgpt", fixture["data_prefix"])
    assert len(loaded.items) == fixture["items"]
    assert sorted({i.task for i in loaded.items}) == ["consistency", "generic", "temporal"]
    assert [e.item_id for e in loaded.errors] == ["temporal_qa/1"]
    # A predictions file is accepted even when its videos are not here: only the judge is needed.
    store.put_json(
        "bench/preds/generic_preds.json",
        [{"video_name": "v_far_away", "Q": "What?", "A": "A dog.", "pred": "A cat."}],
    )
    preds = load(store, "video_chatgpt", "bench/preds")
    assert preds.errors == [] and preds.items[0].data["pred"] == "A cat." and preds.items[0].visual is None


def test_videochatgpt_means_count_failures() -> None:
    graded = [
        Graded(
            "generic",
            scores={"correctness": 4.0, "detail_orientation": 2.0, "contextual_understanding": None},
        ),
        Graded(
            "generic",
            scores={"correctness": 2.0, "detail_orientation": None, "contextual_understanding": None},
        ),
        Graded("consistency", scores={"consistency": 5.0}),
    ]
    rows = {r.task: r for r in BENCHMARKS["video_chatgpt"].summarize(graded)}
    assert rows["correctness"].score == 3.0 and rows["correctness"].failures == 0
    assert rows["detail_orientation"].score == 2.0 and rows["detail_orientation"].failures == 1
    assert rows["contextual_understanding"].score is None and rows["contextual_understanding"].failures == 2
    assert rows["mean"].score == pytest.approx((3.0 + 2.0 + 5.0) / 3) and rows["mean"].failures == 3
    assert "temporal_understanding" not in rows


def test_dreamframe_mc_reads_the_qa_generator_items(store) -> None:
    fixture = write_dreamframe_mc(store)
    loaded = load(store, "dreamframe_mc", fixture["data_prefix"])
    assert loaded.errors == [] and loaded.files == ["datasets/demo/test/multiple_choice.json"]
    items = by_id(loaded)
    assert items["s0_q0"].task == "tiny_story/what"
    assert items["s0_q0"].visual.key == "datasets/demo/videos/s0.mp4"  # relative to the dataset folder
    assert items["s0_q1"].visual.kind == "frames" and len(items["s0_q1"].visual.frame_keys) == 5


def test_dreamframe_mc_uses_the_held_out_split_of_a_dataset(store) -> None:
    item = {
        "video": "videos/s0.mp4",
        "question": "Which colour?",
        "candidates": ["blue", "red"],
        "answer": "red",
    }
    write_dreamframe_mc(store, root="datasets/job1")
    for split in ("train", "validation", "test"):
        store.put_json(f"datasets/job1/mc/{split}.json", [{**item, "id": split}])
    loaded = load(store, "dreamframe_mc", "datasets/job1/")
    assert [i.item_id for i in loaded.items] == ["test"] and loaded.files == ["datasets/job1/mc/test.json"]
    store.delete("datasets/job1/mc/test.json")
    assert [i.item_id for i in load(store, "dreamframe_mc", "datasets/job1/").items] == ["validation"]
    # A one-story dataset has empty held-out splits: its items are all in train, and those are used.
    store.put_json("datasets/job1/mc/test.json", [])
    store.put_json("datasets/job1/mc/validation.json", [])
    ids = [i.item_id for i in load(store, "dreamframe_mc", "datasets/job1/").items]
    assert "train" in ids and "test" not in ids and "validation" not in ids
