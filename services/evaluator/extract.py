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
_LEADING_OPTION = re.compile(r"^\(?\s*([A-Za-z])\s*(?:\)|\.|:|,|\s|$)")


def mvbench_letter(output: str, candidates: list[str]) -> str | None:
    """The option the output picks, read as MVBench does: the answer turn was pre-filled with
    "Best option:(", so the first token is the option ("A)", "(B)", "C. text"). Unlike MVBench's
    ``check_ans`` an empty output is not counted as a match. Falls back to an exact candidate text."""
    letters = option_letters(len(candidates))
    text = output.strip()
    text = re.sub(r"^(best\s+)?(option|answer)\s*(is)?\s*:?\s*", "", text, flags=re.IGNORECASE)
    match = _LEADING_OPTION.match(text)
    if match and match.group(1).upper() in letters and (match.group(1).isupper() or len(text) <= 3):
        return match.group(1).upper()
    by_text = {_norm(c): letters[i] for i, c in enumerate(candidates)}
    return by_text.get(_norm(text))


# --- TempCompass (rules from its eval_*.py) -------------------------------------------------------------
def tempcompass_multi_choice(prediction: str, answer: str) -> int | None:
    """1/0 by TempCompass's hand-crafted rules; None = rules fail (ask the judge)."""
    pred = prediction.replace("</s>", "").strip()
    if pred == answer:
        return 1
    if pred in ("A", "B", "C", "D"):
        return int(pred == answer[0])
    for sep in (".", ")"):
        if any(pred.startswith(f"{letter}{sep}") for letter in "ABCD"):
            return int(pred.split(sep)[0] == answer[0])
    return None


def tempcompass_yes_no(prediction: str, answer: str) -> int | None:
    pred = prediction.replace("</s>", "").strip().lower()
    if pred.startswith("yes"):
        return int(answer.strip().lower() == "yes")
    if pred.startswith("no"):
        return int(answer.strip().lower() == "no")
    return None


def tempcompass_caption_matching(prediction: str, question: str, answer: str) -> int | None:
    """TempCompass's eval_rule: the output must be an option line, its sentence or its index
    ("Caption A", "Option 1", "Sentence B")."""
    pred = prediction.replace("</s>", "").strip()
    options = [line for line in question.split("\n")[1:] if line.strip()]
    sentences = [opt.split(": ", 1)[1] if ": " in opt else opt for opt in options]
    indices = [opt.split(": ", 1)[0] for opt in options]
    chosen = None
    for opt in options:
        if opt == pred:
            chosen = opt
    for sent in sentences:
        if sent == pred or (") " in pred and sent == pred.split(") ", 1)[1]):
            chosen = sent
    for ind in indices:
        if ind == pred or ind == pred.replace(".", ""):
            chosen = ind
    if chosen is None:
        return None
    answer_parts = {answer, answer.split(":")[0]}
    if ": " in answer:
        answer_parts.add(answer.split(": ", 1)[1])
    return int(chosen in answer_parts)


def tempcompass_caption_rating(judge_output: str, mc_answer: str) -> int:
    """Captioning: the judge answered the multi-choice question from the caption alone; it scores 1 when
    its "Answer:" line picks the right option and names exactly one option (TempCompass's parse)."""
    answer_line = judge_output
    for line in judge_output.split("\n"):
        if "Answer" in line:
            answer_line = line.replace("Answer:", "").strip()
    picked = sum(answer_line.count(f"{letter}.") for letter in "ABCD")
    return int(answer_line.split(". ")[0] == mc_answer.split(". ")[0] and picked == 1)


_CORRECT = re.compile(r"\bcorrect\b", re.IGNORECASE)
_INCORRECT = re.compile(r"\bincorrect\b", re.IGNORECASE)


def judge_correct(judge_output: str) -> bool | None:
    """A "Correct"/"Incorrect" verdict; None when it says neither (or both)."""
    incorrect = bool(_INCORRECT.search(judge_output))
    correct = bool(_CORRECT.search(judge_output))
    if incorrect == correct:
        return None
    return correct


# --- Video-Bench ----------------------------------------------------------------------------------------
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
