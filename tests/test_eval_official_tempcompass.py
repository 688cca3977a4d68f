"""TempCompass's official scoring, answer style by answer style: the hand-written rules of its eval
scripts first, then the LLM judge and how its verdict text is read.

Expected outcomes are what llyx97/TempCompass's code gives, worked out from it by hand: eval_multi-choice.py
(exact answer; a lone "A".."D"; "A." / "A)" prefixes, compared with answer[0]), eval_yes_no.py
(``extract_pred``: the lower-cased output starts with "yes"/"no"), eval_caption_matching.py (``eval_rule``:
option line, option sentence (also after "X) "), or index, as written or without "Caption "/"Option "/
"Sentence ", dots removed; later matches win), eval_captioning.py (``parse_llm_output``) and
utils/eval_utils.py (``llm_output_to_rating``). Every script first does ``.replace('</s>', '').strip()``.
None = the rules fail: the official script asks the judge (or rates 0 with --disable_llm).
"""

from __future__ import annotations

from collections import Counter

import openai
import pytest
from test_eval_support import BLUE, RED, FakeOpenAI, make_store, mp4_bytes

from services.evaluator import extract as ex
from services.evaluator.benchmarks import BENCHMARKS
from services.evaluator.benchmarks.base import Location
from services.evaluator.judge import Judge
from services.evaluator.sources import StoreSource

MC_QUESTION = (
    "What is the man doing in the video?\nA. dribbling a basketball\nB. dunking a basketball\n"
    "C. passing a basketball"
)
MC_ANSWER = "B. dunking a basketball"


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B. dunking a basketball", 1),  # equals the answer
        ("B", 1),  # a lone letter, compared with answer[0]
        ("A", 0),
        ("D", 0),  # in the official ["A", "B", "C", "D"] even with three options
        ("B.", 1),  # starts with "B."
        ("B. dribbling a basketball", 1),  # only the letter before the first "." counts
        ("A.B.", 0),
        ("B)", 1),  # starts with "B)"
        ("B) dunking a basketball", 1),
        ("B</s>", 1),  # "</s>" removed
        ("  B \n", 1),  # stripped
        ("B.\nBecause he jumps.", 1),  # still starts with "B."
        ("B\nBecause he jumps.", None),  # neither a lone letter nor "B." / "B)"
        ("(B)", None),  # no rule for brackets: the judge decides
        ("(B) dunking a basketball", None),
        ("Option B", None),
        ("Best option: B", None),
        ("dunking a basketball", None),  # the option's text without its letter
        ("A man is dunking a basketball.", None),  # a text starting with "A " is not option A
        ("b", None),  # the letters are upper-case only
        ("E", None),
        ("2", None),  # numbers
        ("I cannot answer that.", None),  # refusal
        ("", None),  # empty: the rules fail, the judge is asked
    ],
)
def test_multi_choice_rules(prediction: str, expected: int | None) -> None:
    assert ex.tempcompass_multi_choice(prediction, MC_ANSWER) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("yes", "yes", 1),
        ("Yes.", "yes", 1),  # lower-cased before the check
        ("YES, he is.", "yes", 1),
        (" yes", "yes", 1),  # stripped
        ("No", "yes", 0),
        ("no, he is not", "no", 1),
        ("Yesterday he did", "yes", 1),  # only the start is looked at
        ("Not really", "no", 1),  # starts with "no"
        ("Nobody knows", "yes", 0),
        ("I think yes", "yes", None),  # the judge decides
        ("Sure", "yes", None),
        ("1", "yes", None),
        ("", "no", None),
        ("Yes", "Yes", 0),  # compared with the file's answer as written ("yes"/"no")
    ],
)
def test_yes_no_rules(prediction: str, answer: str, expected: int | None) -> None:
    assert ex.tempcompass_yes_no(prediction, answer) == expected


# The three question templates of the real caption_matching.json (Option 1/2, Sentence A/B, Caption A/B).
OPTION_Q = (
    "Which description is a more suitable match for the video?\nOption 1: The man is dribbling a basketball."
    "\nOption 2: A man is dunking a basketball."
)
OPTION_A = "Option 2: A man is dunking a basketball."
SENTENCE_Q = (
    "Which sentence better captures the essence of the video?\nSentence A: A man is dunking a basketball."
    "\nSentence B: A video showing a person passing a basketball."
)
SENTENCE_A = "Sentence A: A man is dunking a basketball."
CAPTION_Q = (
    "Which caption matches the video better?\nCaption A: The man is shooting a basketball."
    "\nCaption B: A man is dunking a basketball."
)
CAPTION_A = "Caption B: A man is dunking a basketball."


@pytest.mark.parametrize(
    ("prediction", "question", "answer", "expected"),
    [
        # bare indices: "Option 1".replace("Option ", "") is "1", "Sentence A" gives "A"
        ("2", OPTION_Q, OPTION_A, 1),
        ("2.", OPTION_Q, OPTION_A, 1),  # dots removed
        ("1", OPTION_Q, OPTION_A, 0),
        ("1.", OPTION_Q, OPTION_A, 0),
        ("A", SENTENCE_Q, SENTENCE_A, 1),
        ("A.", SENTENCE_Q, SENTENCE_A, 1),
        ("B", SENTENCE_Q, SENTENCE_A, 0),
        ("B", CAPTION_Q, CAPTION_A, 1),
        ("A.", CAPTION_Q, CAPTION_A, 0),
        ("A", OPTION_Q, OPTION_A, None),  # no "A" among "Option 1/2" indices
        # indices as written
        ("Option 2", OPTION_Q, OPTION_A, 1),
        ("Option 1.", OPTION_Q, OPTION_A, 0),
        ("Sentence A.", SENTENCE_Q, SENTENCE_A, 1),
        ("Caption A", CAPTION_Q, CAPTION_A, 0),
        # the whole option line, the sentence, the sentence after "X) "
        ("Option 2: A man is dunking a basketball.", OPTION_Q, OPTION_A, 1),
        ("A man is dunking a basketball.", OPTION_Q, OPTION_A, 1),  # starts with "A ": still the sentence
        ("A man is dunking a basketball.", SENTENCE_Q, SENTENCE_A, 1),
        ("The man is shooting a basketball.", CAPTION_Q, CAPTION_A, 0),
        ("2) A man is dunking a basketball.", OPTION_Q, OPTION_A, 1),
        ("B) A man is dunking a basketball.", SENTENCE_Q, SENTENCE_A, 1),  # the sentence wins, not "B"
        # rules fail: the judge decides
        ("A man is dunking a basketball", OPTION_Q, OPTION_A, None),  # no final "."
        ("(2)", OPTION_Q, OPTION_A, None),
        ("A)", SENTENCE_Q, SENTENCE_A, None),
        ("a", SENTENCE_Q, SENTENCE_A, None),
        ("Option 2 is the better match.", OPTION_Q, OPTION_A, None),
        ("2\nBecause he dunks.", OPTION_Q, OPTION_A, None),  # multi-line
        ("The second one", OPTION_Q, OPTION_A, None),
        ("I cannot tell.", OPTION_Q, OPTION_A, None),
        ("", OPTION_Q, OPTION_A, None),
    ],
)
def test_caption_matching_rules(prediction: str, question: str, answer: str, expected: int | None) -> None:
    assert ex.tempcompass_caption_matching(prediction, question, answer) == expected


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [
        ("Correct", True),
        ("Correct.", True),
        ("Correct. The prediction is not incorrect.", True),  # starts with "Correct"
        ("Incorrect", False),
        ("Incorrect - the correct option is different.", False),  # starts with "Incorrect"
        ("The prediction is Correct.", True),  # "Correct" and no "Incorrect"
        ("The prediction is Incorrect.", False),
        ("Correct or Incorrect", True),  # starts with "Correct"
        ("It is not Correct; it is Incorrect.", False),  # "Incorrect" present
        # No capitalised "Correct"/"Incorrect": the official assertion fails and the judge is asked
        # again; after its retries the rating is 0 (here: None, a failure graded wrong).
        ("Partially correct", None),
        ("correct", None),
        ("The prediction is incorrect.", None),
        ("CORRECT", None),
        ("", None),
    ],
)
def test_judge_verdicts(verdict: str, expected: bool | None) -> None:
    assert ex.judge_correct(verdict) is expected


@pytest.mark.parametrize(
    ("judge_output", "expected"),
    [
        ("Reasoning: the caption says he dunks.\nAnswer: B. dunking a basketball", 1),
        ("Answer: B. dunking", 1),  # the text before ". " is compared
        ("Reasoning: hmm\nAnswer: A. dribbling a basketball", 0),
        ("Answer: B", 0),  # no "B." in the answer: zero options named
        ("Answer: B.", 0),  # "B." is not "B" (split on ". ")
        ("Answer: A. dribbling or B. dunking", 0),  # two options named
        ("Answer: None of the choices are correct", 0),
        ("B. dunking a basketball", 1),  # no "Answer" line: the whole reply
        ("Answer: B. dunking a basketball\nAnswer: A. dribbling a basketball", 0),  # the last line wins
    ],
)
def test_captioning_judge_answer(judge_output: str, expected: int) -> None:
    assert ex.tempcompass_caption_rating(judge_output, MC_ANSWER) == expected


# --- real-format files and the judge over HTTP ----------------------------------------------------------
def write_tempcompass_files(store, root: str = "TempCompass") -> None:
    """TempCompass as llyx97/TempCompass ships it: questions/{multi-choice,yes_no,caption_matching,
    captioning}.json as {video_id: {dimension: [{question, answer}]}}, videos/<video_id>.mp4."""
    store.put_bytes(f"{root}/videos/1034419625.mp4", mp4_bytes([RED] * 8))
    store.put_bytes(f"{root}/videos/1006730263.mp4", mp4_bytes([BLUE] * 8))
    store.put_json(
        f"{root}/questions/multi-choice.json",
        {
            "1034419625": {"action": [{"question": MC_QUESTION, "answer": MC_ANSWER}]},
            "1006730263": {
                "direction": [
                    {
                        "question": "Where is the car going?\nA. to the left\nB. to the right",
                        "answer": "A. to the left",
                    }
                ]
            },
        },
    )
    store.put_json(
        f"{root}/questions/yes_no.json",
        {"1034419625": {"action": [{"question": "Is the man dunking?", "answer": "yes"}]}},
    )
    store.put_json(
        f"{root}/questions/caption_matching.json",
        {
            "1034419625": {
                "action": [
                    {"question": OPTION_Q, "answer": OPTION_A},
                    {"question": SENTENCE_Q, "answer": SENTENCE_A},
                    {"question": CAPTION_Q, "answer": CAPTION_A},
                ]
            }
        },
    )
    store.put_json(
        f"{root}/questions/captioning.json",
        {
            "1034419625": {
                "action": [
                    {
                        "question": "You will be presented with a video and several pieces of information. "
                        "One piece of information is consistent with the video while the others are not. "
                        "Please identify the information that consistent with the video and generate a "
                        "video caption accordingly.\nInformation A: {'subject': 'man', 'action': "
                        "'dribbling a basketball'}\nInformation B: {'subject': 'man', 'action': 'dunking a "
                        "basketball'}\nGenerated Caption:",
                        "answer": "B. dunking a basketball",
                    }
                ]
            }
        },
    )


def verdicts(body: dict, seen: Counter) -> str:
    """The judge: a verdict chosen by the model prediction in the prompt, or a caption answer."""
    text = body["messages"][-1]["content"]
    if "Video Description:" in text:
        return "Reasoning: the caption says he dunks.\nAnswer: B. dunking a basketball"
    prediction = text.rsplit("Model Prediction:", 1)[-1].strip()
    return {
        "(B)": "Correct. The prediction is not incorrect.",
        "Option 1 fits": "Incorrect - the correct option is different.",
        "maybe": "Partially correct",
    }[prediction]


def test_tempcompass_files_graded_with_rules_then_the_judge(tmp_path) -> None:
    store = make_store(tmp_path)
    write_tempcompass_files(store)
    bench = BENCHMARKS["tempcompass"]
    loaded = bench.load(Location(StoreSource(store), "TempCompass/questions"), None, max_items=0)
    assert not loaded.errors and len(loaded.items) == 7
    items = {i.item_id: i for i in loaded.items}
    assert items["multi-choice/1034419625/action/0"].visual.key == "TempCompass/videos/1034419625.mp4"
    replies = {
        "multi-choice/1034419625/action/0": "(B)",  # rules fail → judge: "Correct. …" → right
        "multi-choice/1006730263/direction/0": "maybe",  # judge never parseable → failure, wrong
        "yes_no/1034419625/action/0": "Yes, he is.",  # rule → right
        "caption_matching/1034419625/action/0": "2",  # bare index → rule → right
        "caption_matching/1034419625/action/1": "A.",  # bare index with a dot → rule → right
        "caption_matching/1034419625/action/2": "Option 1 fits",  # judge: "Incorrect - …" → wrong
        "captioning/1034419625/action/0": "A man dunks a basketball.",  # judge answers B → right
    }
    with FakeOpenAI(verdicts) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0)
        judge = Judge(client, "judge", max_attempts=2)
        graded = {i.item_id: bench.grade(i, {"prediction": replies[i.item_id]}, judge) for i in loaded.items}
        client.close()
    outcome = {k: (g.correct, g.detail["matched_by"], g.failures, g.judge_calls) for k, g in graded.items()}
    assert outcome == {
        "multi-choice/1034419625/action/0": (True, "judge", 0, 1),
        "multi-choice/1006730263/direction/0": (False, "none", 1, 1),
        "yes_no/1034419625/action/0": (True, "rule", 0, 0),
        "caption_matching/1034419625/action/0": (True, "rule", 0, 0),
        "caption_matching/1034419625/action/1": (True, "rule", 0, 0),
        "caption_matching/1034419625/action/2": (False, "judge", 0, 1),
        "captioning/1034419625/action/0": (True, "judge", 0, 1),
    }
    # "Partially correct" was asked again (max_attempts) before counting as a failure.
    assert graded["multi-choice/1006730263/direction/0"].detail["judge"]["attempts"] == 2
    rows = {r.task: r for r in bench.summarize(list(graded.values()))}
    assert rows["caption_matching"].score == pytest.approx(200 / 3)
    # print_result's "Match Success Rate": the share decided by the rules, per task type
    assert rows["caption_matching"].extra["match_success_rate"] == 66.7
    assert rows["multi-choice"].extra["match_success_rate"] == 0.0
    assert rows["captioning"].extra["match_success_rate"] == 0.0
    assert rows["overall"].score == pytest.approx(500 / 7)


def test_caption_matching_items_must_have_official_option_lines(tmp_path) -> None:
    store = make_store(tmp_path)
    write_tempcompass_files(store)
    store.put_json(
        "TempCompass/questions/caption_matching.json",
        {
            "1034419625": {
                "action": [
                    {"question": "Which?\nA man dunks.\nA man passes.", "answer": "A man dunks."},
                    {"question": CAPTION_Q, "answer": "Caption C: nothing."},
                ]
            }
        },
    )
    loaded = BENCHMARKS["tempcompass"].load(
        Location(StoreSource(store), "TempCompass/questions"), None, max_items=0
    )
    reasons = {e.item_id: e.reason for e in loaded.errors}
    assert reasons == {
        "caption_matching/1034419625/action/0": 'caption_matching options must be lines "<index>: <caption>"',
        "caption_matching/1034419625/action/1": "caption_matching answer is not one of the option lines",
    }
