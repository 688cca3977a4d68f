"""``dreamframe dataset check``: a dataset's conversation records against one profile's loader rules.

Our own implementation of what each target trainer's data loader does with a record (profiles.py names
the files); a record that would fail, be silently replaced by another sample, or train without its
visuals or its question is reported with its id. Rules:

- ``record``: a JSON object with a ``conversations`` list of ``{"from", "value"}`` turns.
- ``roles``: ``from`` is "human" or "gpt" (both train.py map only these two), the first turn is from
  the human (``preprocess_*`` drops a first turn that is not) and turns alternate
  (``assert role == conv.roles[j % 2]``); the last turn is an answer.
- ``media``: the fields the loader reads. LLaMA-VID's ``__getitem__`` tries ``'image'`` (one file) then
  ``'video'``; LLaVA-NeXT's ``_get_item`` tries ``'image'`` (a file or a list of files) then ``'video'``.
  Neither reads ``frames``: such a record trains with no visuals.
- ``image-token``: ``<image>`` only in human turns; one in the first human turn for a video or one image
  (``preprocess_multimodal`` moves it to the turn's start; LLaMA-VID's ``preprocess_imgsp_v1`` adds one
  to later turns itself), one per file for an image list (LLaVA-NeXT moves none when there are several);
  none without media.
- ``text-query`` (LLaMA-VID): each human turn, ``<image>`` and newlines removed, is the text query that
  bert-base-uncased's tokenizer cuts to 256 tokens ([CLS] and [SEP] included) from the LEFT
  (llamavid_arch.py: ``init_bert(..., truncation_side="left")``, ``vlm_attention``: ``truncation=True,
  max_length=256``): the last 254 tokens of the turn are kept, so the question (the turn without its
  ``Subtitles:`` block) must start within them. Tokens are counted exactly with bert-base-uncased's
  WordPiece vocabulary (dreamframe.models.bert_vocab) where it is on this machine; without it, as BERT's
  basic tokenizer splits text (whitespace, then each punctuation mark alone), a lower bound: WordPiece
  only splits further, so a question reported then is certainly cut. ``Report.token_count`` says which.
- ``media-path``: paths are joined to the trainer's ``video_folder``/``image_folder`` (the dataset
  folder) with ``os.path.join``: no absolute path (it would replace the folder), no ``..`` out of it,
  and the file exists.
- ``video``: each video decodes, its rate keeps ``round(fps / video_fps)`` >= 1 with ``--video_fps 1``,
  and it lasts at most ``max_video_seconds`` (LLaMA-VID's 5-minute video data, README "maxtime_5min").
"""

from __future__ import annotations

import io
import json
import posixpath
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av

from dreamframe.errors import InvalidArgument, NotFound
from dreamframe.limits import truncate
from dreamframe.storage.base import ObjectStore, validate_key

from .profiles import GPT, HUMAN, IMAGE_TOKEN, Profile, get_profile

MANIFEST = "manifest.json"
SUBTITLES_HEADER = "subtitles:"
DEFAULT_MAX_VIDEO_SECONDS = 300.0
# What a report echoes of a record's own strings (ids and paths are caller data).
_ECHO = 60


@dataclass(frozen=True)
class Problem:
    file: str
    index: int
    id: str
    rule: str
    message: str

    def line(self) -> str:
        return f"{self.file}[{self.index}] {self.id}: {self.rule}: {self.message}"


@dataclass
class Report:
    profile: str
    files: list[str] = field(default_factory=list)
    records: int = 0
    problems: list[Problem] = field(default_factory=list)
    # How the text query's tokens were counted: EXACT or APPROXIMATE ('' when the profile has none).
    token_count: str = ""

    @property
    def bad_records(self) -> int:
        return len({(p.file, p.index) for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems


# --- where a dataset and its media are --------------------------------------------------------------


class Media:
    """Media paths of records, resolved as the loaders do against the dataset folder."""

    def __init__(self, exists: Callable[[str], bool], read: Callable[[str], bytes]) -> None:
        self._exists = exists
        self._read = read
        self._seen: dict[str, bool] = {}

    def exists(self, rel: str) -> bool:
        if rel not in self._seen:
            self._seen[rel] = self._exists(rel)
        return self._seen[rel]

    def read(self, rel: str) -> bytes:
        return self._read(rel)


@dataclass
class Dataset:
    files: list[tuple[str, object]]
    media: Media


def _relative(path: str) -> str | None:
    """The normalised path inside the dataset folder, or None when it is absolute or leaves it."""
    if not path or path.startswith("/") or "\\" in path:
        return None
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def open_local(path: Path) -> Dataset:
    """A dataset folder (with manifest.json or conversations/*.json), a manifest, or one record file."""
    if path.is_dir():
        root = path
        manifest = path / MANIFEST
        if manifest.is_file():
            names = _manifest_conversations(_load_json(manifest.read_bytes(), MANIFEST), MANIFEST)
        else:
            names = sorted(p.relative_to(root).as_posix() for p in root.glob("conversations/*.json"))
        if not names:
            raise InvalidArgument("no conversations/*.json in the dataset folder", field="dataset")
        files = []
        for name in names:
            rel = _relative(name)
            if rel is None or not (root / rel).is_file():
                raise NotFound(
                    f"the dataset lists {truncate(name, _ECHO)!r}, which is missing", field="dataset"
                )
            files.append((rel, _load_json((root / rel).read_bytes(), rel)))
    elif path.is_file():
        data = _load_json(path.read_bytes(), path.name)
        if isinstance(data, dict):
            return open_local(path.parent)
        root = path.parent.parent if path.parent.name == "conversations" else path.parent
        files = [(path.relative_to(root).as_posix(), data)]
    else:
        raise NotFound("no such file or folder", field="dataset")

    def exists(rel: str) -> bool:
        return (root / rel).is_file()

    return Dataset(files, Media(exists, lambda rel: (root / rel).read_bytes()))


def open_stored(store: ObjectStore, where: str) -> Dataset:
    """A dataset in storage: its prefix (``datasets/<name>/``), its manifest, or one record file."""
    key = where if where.endswith(".json") else where.rstrip("/") + "/" + MANIFEST
    validate_key(key, field="dataset")
    if not store.exists(key):
        raise NotFound(f"no object {truncate(key, 200)!r}", field="dataset")
    data = _load_json(store.get_bytes(key), posixpath.basename(key))
    folder = posixpath.dirname(key)
    if isinstance(data, dict):
        files = []
        for name in _manifest_conversations(data, key):
            rel = _relative(name)
            if rel is None or not store.exists(f"{folder}/{rel}"):
                raise NotFound(
                    f"the manifest lists {truncate(name, _ECHO)!r}, which is missing", field="dataset"
                )
            files.append((rel, _load_json(store.get_bytes(f"{folder}/{rel}"), rel)))
    else:
        name = posixpath.basename(key)
        if posixpath.basename(folder) == "conversations":
            folder, name = posixpath.dirname(folder), f"conversations/{name}"
        files = [(name, data)]
    prefix = f"{folder}/" if folder else ""

    def exists(rel: str) -> bool:
        try:
            return store.exists(prefix + rel)
        except InvalidArgument:
            return False

    return Dataset(files, Media(exists, lambda rel: store.get_bytes(prefix + rel)))


def _manifest_conversations(manifest: object, name: str) -> list[str]:
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgument(f"{name} has no 'files' list", field="dataset")
    paths = [e.get("path") for e in entries if isinstance(e, dict)]
    return sorted(
        p for p in paths if isinstance(p, str) and p.startswith("conversations/") and p.endswith(".json")
    )


def _load_json(data: bytes, name: str) -> object:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidArgument(
            f"{truncate(name, _ECHO)} is not JSON ({exc.__class__.__name__})", field="dataset"
        ) from None


# --- the rules -----------------------------------------------------------------------------------------


def check_dataset(
    dataset: Dataset, profile_name: str = "", *, max_video_seconds: float | None = None
) -> Report:
    """Every record of every conversation file checked; ``max_video_seconds`` None means 300, 0 no cap."""
    profile = get_profile(profile_name, field="profile")
    cap = DEFAULT_MAX_VIDEO_SECONDS if max_video_seconds is None else max_video_seconds
    report = Report(profile=profile.name, files=[name for name, _ in dataset.files])
    counter = query_counter() if profile.text_query_tokens else None
    report.token_count = counter.kind if counter else ""
    videos: dict[str, str | None] = {}
    for name, records in dataset.files:
        if not isinstance(records, list):
            report.problems.append(Problem(name, -1, "-", "record", "the file is not a JSON list of records"))
            continue
        for index, record in enumerate(records):
            report.records += 1
            rid = _record_id(record, index)
            for rule, message in check_record(record, profile, dataset.media, videos, cap, counter):
                report.problems.append(Problem(name, index, rid, rule, message))
    return report


def check_record(
    record: object,
    profile: Profile,
    media: Media,
    videos: dict[str, str | None],
    cap: float,
    counter: QueryCounter | None = None,
) -> Iterator[tuple[str, str]]:
    """(rule, message) for each way ``record`` breaks the profile's loader rules."""
    if not isinstance(record, dict):
        yield "record", "not a JSON object"
        return
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        yield "record", "no 'conversations' list"
        return
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        yield "record", "every turn must be an object with a string 'value'"
        return
    yield from _roles(turns)
    kind, paths, problem = _media_of(record, profile)
    if problem:
        yield "media", problem
    yield from _image_tokens(turns, kind, len(paths))
    if profile.text_query_tokens:
        yield from _text_query(turns, profile.text_query_tokens, counter or query_counter())
    for path in paths:
        rel = _relative(path)
        if rel is None:
            yield (
                "media-path",
                (
                    f"{truncate(path, _ECHO)!r} is absolute or leaves the dataset folder "
                    "(os.path.join(video_folder, path) would not resolve inside it)"
                ),
            )
        elif not media.exists(rel):
            yield "media-path", f"missing media {truncate(path, _ECHO)!r}"
        elif kind == "video":
            if rel not in videos:
                videos[rel] = _video_problem(media, rel, profile, cap)
            if videos[rel]:
                yield "video", f"{truncate(path, _ECHO)!r}: {videos[rel]}"


def _roles(turns: list[dict]) -> Iterator[tuple[str, str]]:
    roles = [t.get("from") for t in turns]
    for j, role in enumerate(roles):
        if role not in (HUMAN, GPT):
            yield (
                "roles",
                f"turn {j} is from {truncate(str(role), 20)!r}; the loaders know only 'human' and 'gpt'",
            )
            return
    if roles[0] != HUMAN:
        yield "roles", "turn 0 is from 'gpt': the loader drops it (the first turn must be the human's)"
        return
    for j, role in enumerate(roles):
        if role != (HUMAN, GPT)[j % 2]:
            yield "roles", f"turn {j} is from {role!r}: turns must alternate human, gpt (train.py asserts it)"
            return
    if roles[-1] != GPT:
        yield "roles", "the last turn is a question without an answer"


def _media_of(record: dict, profile: Profile) -> tuple[str, list[str], str]:
    """(kind, paths, problem): what the loader reads, in its order ('image' first, then 'video')."""
    if "image" in record:
        image = record["image"]
        if isinstance(image, str) and image:
            return "image", [image], ""
        if (
            profile.image_list
            and isinstance(image, list)
            and image
            and all(isinstance(i, str) and i for i in image)
        ):
            return "images", list(image), ""
        wanted = "a file path or a list of them" if profile.image_list else "one file path"
        return "image", [], f"'image' must be {wanted} for {profile.loader}"
    if "video" in record:
        video = record["video"]
        if isinstance(video, str) and video:
            return "video", [video], ""
        return "video", [], "'video' must be a file path"
    if "frames" in record:
        return (
            "",
            [],
            (
                f"'frames' is not read by {profile.loader} (only 'image' and 'video'): the record "
                "would train without visuals"
            ),
        )
    return "", [], ""


def _image_tokens(turns: list[dict], kind: str, count: int) -> Iterator[tuple[str, str]]:
    per_turn = [t["value"].count(IMAGE_TOKEN) for t in turns]
    human = [j for j, t in enumerate(turns) if t.get("from") == HUMAN]
    human_set = set(human)
    if any(n for j, n in enumerate(per_turn) if j not in human_set):
        yield "image-token", "<image> in an answer turn"
    total = sum(per_turn[j] for j in human)
    if not kind:
        if total:
            yield "image-token", "<image> without any 'image' or 'video' the loader reads"
        return
    if kind == "images":
        if total != count:
            yield "image-token", f"{total} <image> for {count} images: one per image file"
        return
    first = per_turn[human[0]] if human else 0
    if total == 0:
        yield "image-token", "no <image> in the first human turn: the model never sees the visuals"
    elif first == 0:
        yield "image-token", "<image> is not in the first human turn"
    elif total > 1:
        yield "image-token", f"{total} <image> for one {kind}: only the first human turn has one"


EXACT = "exact (bert-base-uncased WordPiece)"
APPROXIMATE = "approximate (BERT basic tokens, a lower bound; bert-base-uncased's vocab.txt is not here)"


class QueryCounter:
    """Where each token of a text query starts (character offsets), exact or approximate."""

    def __init__(self, tokenizer=None, reason: str = "") -> None:
        self._tok = tokenizer
        self.kind = EXACT if tokenizer is not None else APPROXIMATE
        self.reason = reason

    def starts(self, text: str) -> list[int]:
        if self._tok is None:
            return bert_basic_starts(text)
        return [start for start, _ in self._tok.encode(text, add_special_tokens=False).offsets]


def query_counter() -> QueryCounter:
    """Exact with bert-base-uncased's vocabulary (plus LLaMA-VID's added "[DEC]"), else approximate."""
    from dreamframe.errors import FailedPrecondition
    from dreamframe.models import bert_vocab

    try:
        return QueryCounter(bert_vocab.wordpiece_tokenizer(extra_special=("[DEC]",)))
    except FailedPrecondition as exc:
        return QueryCounter(None, str(exc))


def _text_query(turns: list[dict], limit: int, counter: QueryCounter) -> Iterator[tuple[str, str]]:
    budget = limit - 2  # [CLS] and [SEP]; LLaMA-VID truncates from the left, so the last `budget` stay
    at_least = "" if counter.kind == EXACT else "at least "
    for j, turn in enumerate(turns):
        if turn.get("from") != HUMAN:
            continue
        flat, start, end = _question_span(turn["value"])
        if end is None:
            yield "text-query", f"human turn {j} has no question (only <image> or subtitles)"
            continue
        starts = counter.starts(flat)
        # Tokens from the one holding the question's first character to the end of the turn.
        first = next((k for k, s in enumerate(starts) if s > start), len(starts)) - 1
        from_question = len(starts) - max(first, 0)
        if from_question > budget:
            yield (
                "text-query",
                (
                    f"the question in human turn {j} starts {at_least}{from_question} BERT tokens before the "
                    f"end of LLaMA-VID's text query, which keeps the last {budget} (+[CLS], [SEP] = {limit}; "
                    f"truncation from the left): it is cut off (put the subtitles before the question); "
                    f"count: {counter.kind}"
                ),
            )


def _question_span(value: str) -> tuple[str, int, int | None]:
    """(the turn as LLaMA-VID's text query sees it, where its question starts and ends in it): the
    question is the turn's text outside a block that starts with a 'Subtitles:' line and runs to a
    blank line."""
    flat_parts: list[str] = []
    offset, start, end, in_block = 0, 0, None, False
    for line in value.replace(IMAGE_TOKEN, "").split("\n"):
        stripped = line.strip()
        if stripped.casefold() == SUBTITLES_HEADER:
            in_block = True
        elif in_block and not stripped:
            in_block = False
        elif not in_block and stripped:
            if end is None:
                start = offset + (len(line) - len(line.lstrip()))
            end = offset + len(line)
        flat_parts.append(line)
        offset += len(line)
    return "".join(flat_parts), start, end


def bert_basic_starts(text: str) -> list[int]:
    """Where each token BERT's BasicTokenizer makes of ``text`` starts (whitespace split, then every
    punctuation mark and CJK character alone): a lower bound of its WordPiece tokens."""
    starts = []
    in_run = False
    for i, ch in enumerate(text):
        if ch.isspace():
            in_run = False
        elif _is_punctuation(ch) or 0x4E00 <= ord(ch) <= 0x9FFF:
            starts.append(i)
            in_run = False
        elif not in_run:
            starts.append(i)
            in_run = True
    return starts


def bert_basic_tokens(text: str) -> int:
    """How many tokens BERT's BasicTokenizer makes of ``text`` (see :func:`bert_basic_starts`)."""
    return len(bert_basic_starts(text))


def _is_punctuation(ch: str) -> bool:
    # BERT's _is_punctuation: ASCII non-alphanumeric symbols count too ("^", "$", "`").
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _video_problem(media: Media, rel: str, profile: Profile, cap: float) -> str | None:
    try:
        with av.open(io.BytesIO(media.read(rel))) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0)
            frames = sum(1 for packet in container.demux(stream) if packet.size)
    except Exception:  # noqa: BLE001 - any decoding failure means the loader cannot read it either
        return "not a readable video"
    if not rate or round(rate / profile.video_fps) < 1:
        return f"{rate:g} fps: the loader's frame step round(fps / {profile.video_fps}) is 0"
    seconds = frames / rate
    if cap and seconds > cap + 1e-6:
        return f"{seconds:.0f} s, longer than {cap:g} s"
    return None


def _record_id(record: object, index: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return truncate(str(rid), _ECHO) if isinstance(rid, str | int) and str(rid) else f"#{index}"
