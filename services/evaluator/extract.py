"""Answer extraction: each benchmark's own rules for reading a model's (or a judge's) free text.

Every function returns None when its rules cannot decide, so the caller can fall back to an LLM judge
(TempCompass, Video-Bench) or count a failure; none of them guesses.
"""

from __future__ import annotations

import ast
import json
import re
import string

LETTERS = string.ascii_uppercase


def option_letters(count: int) -> list[str]:
    return list(LETTERS[:count])


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


# --- MVBench / DreamFrame MC ----------------------------------------------------------------------------
# Official rule (OpenGVLab/Ask-Anything, video_chat2/mvbench.ipynb): the answer turn is pre-filled with
# "Best option:(", generation stops at "###", the reply is cut after the last "Assistant:", stripped, and
# only its first line is kept, with "(" put back in front (``infer_mvbench``'s return_prompt); then
# ``check_ans`` compares the first space-separated word of that, lower-cased and without dots, with the
# ground truth's "(x)" by substring containment both ways. So "B", "B)", "(B" and even an empty reply
# ("(" is inside "(b)") are right; "Option B", "Best option: (B)", "B:" or option B's bare text are not.
MVBENCH_RETURN_PROMPT = "("


def mvbench_gt(candidates: list[str], answer_idx: int) -> str:
    """The ground truth as ``MVBench_dataset.qa_template`` writes it: "(B) <text of option B>"."""
    return f"({LETTERS[answer_idx]}) {candidates[answer_idx]}"


def mvbench_pred(reply: str) -> str:
    """What the notebook scores for a generated reply: ``answer()`` keeps the text before "###" and after
    the last "Assistant:", ``infer_mvbench`` its first line after strip(), prefixed with "("."""
    text = reply.split("###")[0].split("Assistant:")[-1].strip()
    return MVBENCH_RETURN_PROMPT + text.strip().split("\n")[0]


def mvbench_check_ans(pred: str, gt: str) -> bool:
    """Our own implementation of the notebook's ``check_ans(pred, gt)``: the first space-separated word
    of each, lower-cased; right when the prediction's (dots removed) is a substring of the truth's, or
    the truth's a substring of the prediction's."""
    pred_option = pred.lower().split(" ")[0]
    gt_option = gt.lower().split(" ")[0]
    return pred_option.replace(".", "") in gt_option or gt_option in pred_option


def mvbench_official_correct(reply: str, candidates: list[str], answer_idx: int) -> bool:
    """MVBench's outcome for a generated reply (the text after "Best option:(")."""
    return mvbench_check_ans(mvbench_pred(reply), mvbench_gt(candidates, answer_idx))


# Lenient reading (not MVBench's: an option, ``lenient_answer_matching``, reported in its own column).
_ANSWER_LEAD = re.compile(
    r"^(?:(?:the\s+)?(?:best\s+)?(?:option|answer|choice)(?:\s+is)?\s*[:\-]?\s*)+", re.IGNORECASE
)
_LABEL = re.compile(r"^\(?\s*([A-Za-z])\s*(\)|\.|:|,|$)\s*(.*)$", re.DOTALL)
_BARE_LETTER = re.compile(r"^([A-Za-z])\s+(.*)$", re.DOTALL)


def mvbench_letter(output: str, candidates: list[str]) -> str | None:
    """The option an output names, read leniently (None: none): the first non-empty line, after
    "Best option:", "Option", "The answer is"; exactly a candidate's text (so option B's text "A woman
    slips…" is B, not A); a label "(B)", "B)", "B.", "B:", a lone letter, or "B <option B's text>".
    An empty reply, a refusal or a number names nothing."""
    letters = option_letters(len(candidates))
    by_text = {_norm(c): letters[i] for i, c in enumerate(candidates)}
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return None
    text = lines[0].strip()
    if _norm(text) in by_text:
        return by_text[_norm(text)]
    text = _ANSWER_LEAD.sub("", text).strip()
    if _norm(text) in by_text:
        return by_text[_norm(text)]
    match = _LABEL.match(text)
    # A letter followed by ")", ".", ":" or "," is a label whatever follows; a bare letter must stand alone.
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    match = _BARE_LETTER.match(text)
    if match and match.group(1).upper() in letters:
        letter = match.group(1).upper()
        # "B the man stands up" names B; "A woman slips…" that is no option's text names nothing.
        if _norm(match.group(2)) == _norm(candidates[letters.index(letter)]):
            return letter
    return None


# --- TempCompass (llyx97/TempCompass, eval_*.py and utils/eval_utils.py) --------------------------------
def tempcompass_clean(prediction: str) -> str:
    """Every eval script first does ``prediction.replace('</s>', '').strip()``."""
    return prediction.replace("</s>", "").strip()


def tempcompass_multi_choice(prediction: str, answer: str) -> int | None:
    """1/0 by eval_multi-choice.py's hand-crafted rules; None = rules fail (ask the judge)."""
    pred = tempcompass_clean(prediction)
    if pred == answer:
        return 1
    head = answer[:1]
    if pred in ("A", "B", "C", "D"):
        return int(pred == head)
    if any(pred.startswith(f"{letter}.") for letter in "ABCD"):
        return int(pred.split(".")[0] == head)
    if any(pred.startswith(f"{letter})") for letter in "ABCD"):
        return int(pred.split(")")[0] == head)
    return None


def tempcompass_yes_no(prediction: str, answer: str) -> int | None:
    """eval_yes_no.py's ``extract_pred``: the lower-cased output starts with "yes" or "no"; compared
    with the answer as the file gives it ("yes"/"no")."""
    pred = tempcompass_clean(prediction).lower()
    if pred.startswith("yes"):
        return int(answer == "yes")
    if pred.startswith("no"):
        return int(answer == "no")
    return None


def caption_matching_options(question: str) -> list[str]:
    """The option lines of a caption-matching question (every line after the first). Each must read
    "<index>: <sentence>" (the official ``eval_rule`` splits on ": " and fails otherwise)."""
    return question.split("\n")[1:]


def tempcompass_caption_matching(prediction: str, question: str, answer: str) -> int | None:
    """eval_caption_matching.py's ``eval_rule``: the output must equal an option line, an option
    sentence (also after a "X) " label), or an index, either as written ("Caption A", "Option 1",
    "Sentence B") or bare ("A", "1"), dots removed ("A.", "1."). Later kinds of match win, as there.
    None when nothing matches (the official "fail": ask the judge)."""
    pred = tempcompass_clean(prediction)
    options = caption_matching_options(question)
    if not options or any(": " not in opt for opt in options) or ": " not in answer:
        return None
    sentences = [opt.split(": ")[1] for opt in options]
    heads = [opt.split(": ")[0] for opt in options]
    indices = heads + [
        h.replace("Sentence ", "").replace("Option ", "").replace("Caption ", "") for h in heads
    ]
    chosen = None
    for opt in options:
        if opt == pred:
            chosen = opt
    for sent in sentences:
        if sent == pred or (") " in pred and sent == pred.split(") ")[1]):
            chosen = sent
    for ind in indices:
        if ind == pred or ind == pred.replace(".", ""):
            chosen = ind
    if chosen is None:
        return None
    head_words = answer.split(": ")[0].split()
    accepted = [answer, answer.split(":")[0], answer.split(": ")[1]]
    if len(head_words) > 1:
        accepted.append(head_words[1])
    return int(chosen in accepted)


def tempcompass_caption_rating(judge_output: str, mc_answer: str) -> int:
    """Captioning (eval_captioning.py's ``parse_llm_output``): the judge answered the multi-choice
    question from the caption alone; the last line holding "Answer" (else the whole reply) is its
    answer; 1 when that answer's text before ". " equals the truth's and exactly one of "A.".."D."
    occurs in it."""
    answer_line = None
    for line in judge_output.split("\n"):
        line = line.strip()
        if "Answer" in line:
            answer_line = line.replace("Answer:", "").strip()
    if answer_line is None:
        answer_line = judge_output
    picked = sum(answer_line.count(f"{letter}.") for letter in "ABCD")
    return int(answer_line.split(". ")[0] == mc_answer.split(". ")[0] and picked == 1)


def judge_correct(judge_output: str) -> bool | None:
    """TempCompass's judge verdict, as utils/eval_utils.py's ``llm_output_to_rating`` reads it
    (case-sensitive): starts with "Correct" → right; starts with "Incorrect" → wrong; else "Correct"
    without "Incorrect" anywhere → right; "Incorrect" anywhere → wrong. Neither word (e.g. "Partially
    correct", "correct" in lower case) fails its assertion and is asked again: None here."""
    if "Correct" not in judge_output and "Incorrect" not in judge_output:
        return None
    if judge_output.startswith("Correct"):
        return True
    if judge_output.startswith("Incorrect"):
        return False
    return "Incorrect" not in judge_output


# --- Video-Bench ----------------------------------------------------------------------------------------
_LEADING_OPTION = re.compile(r"^\(?\s*([A-Za-z])\s*(?:\)|\.|:|,|\s|$)")


def videobench_letter(output: str, choices: dict[str, str]) -> str | None:
    """Unambiguous outputs ("B", "(B)", "B. text", exactly a choice's text); None sends it to the judge."""
    text = output.strip()
    text = re.sub(
        r"^(the\s+)?(best\s+)?(answer|option|choice)\s*(is)?\s*:?\s*", "", text, flags=re.IGNORECASE
    )
    match = _LEADING_OPTION.match(text)
    if match and match.group(1).isupper() and match.group(1) in choices:
        return match.group(1)
    by_text = {_norm(v): k for k, v in choices.items()}
    return by_text.get(_norm(text))


# --- judges' structured answers ---------------------------------------------------------------------------
_BRACES = re.compile(r"\{.*?\}", re.DOTALL)


def _first_dict(text: str) -> dict | None:
    for candidate in _BRACES.findall(text):
        for parse in (ast.literal_eval, json.loads):
            try:
                value = parse(candidate)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    return None


def parse_score(judge_output: str, *, low: float = 0.0, high: float = 5.0) -> float | None:
    """Video-ChatGPT's judge answers a Python dict string ``{'score': 4}``; read it with
    ast.literal_eval (JSON as a fallback). None when malformed or out of range."""
    value = _first_dict(judge_output)
    if value is None or "score" not in value:
        return None
    score = value["score"]
    if isinstance(score, bool):
        return None
    if isinstance(score, str):
        try:
            score = float(score.strip())
        except ValueError:
            return None
    if not isinstance(score, int | float) or not (low <= score <= high):
        return None
    return float(score)


def parse_choice(judge_output: str, letters: list[str]) -> str | None:
    """Video-Bench's judge answers ``{"maximum probability": "B"}``."""
    value = _first_dict(judge_output)
    if value is None:
        return None
    for key, choice in value.items():
        if str(key).strip().lower() == "maximum probability" and isinstance(choice, str):
            choice = choice.strip().strip("()").strip()
            return choice[:1].upper() if choice[:1].upper() in letters and len(choice) <= 2 else None
    return None
