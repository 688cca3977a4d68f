"""The storyboard: static HTML pages showing the keyframes in story order with dialogues and QA, and
paged contact sheets, built per story as soon as that story's frames are rendered.

    jobs/<job>/storyboard/index.html                      the job page: links every story's page
    jobs/<job>/storyboard/story_<sss>.html                a story's page
    jobs/<job>/storyboard/contact_sheet_<sss>_<pp>.jpg    its contact sheets, SHEET_THUMBS frames each
    jobs/<job>/storyboard/story_<sss>.json                what was built, from which story and frames

A story's board is made from the thumbnails the renderer writes beside its frames
(``keys.frame_thumb_key``, a few KB each), never from the full PNGs; a frame rendered before thumbnails
existed gets its thumbnail made from the PNG once (and stored). The manifest is written last and names
the story and frames it was built from (their sha256), so a build asked for again keeps a board whose
manifest, page and sheets all verify and that was built from the same story and frames.

Pages point at images by relative path (``../stories/000/thumbs/000000.jpg``, linking the full
``../stories/000/frames/000000.png``), so they work in the bucket, behind any static server, and in the
``runs/<job>/`` folder the CLI exports. Plain HTML and inline CSS: no scripts, nothing fetched from
elsewhere, every text escaped.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, ImageDraw

from dreamframe import keys, thumbnails
from dreamframe.errors import NotFound
from dreamframe.storage.base import ObjectRef, ObjectStore, sha256_bytes
from dreamframe.story import Story, load_story

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1
SHEET_THUMBS = 256  # thumbnails per contact sheet
SHEET_COLUMNS = 16
# Pixels per thumbnail on a sheet: half the thumbnail's size, which a JPEG decodes to directly (DCT
# scaling, no resize), so a sheet costs its builder (a renderer replica, else the coordinator) ~0.3 ms of
# CPU per frame; 16×16 cells = 1536 px.
SHEET_CELL = thumbnails.THUMB_SIZE // 2
SHEET_MAX_BYTES = 2 * 1024 * 1024
SHEET_QUALITIES = (80, 65, 50, 35, 20)  # tried in turn until the sheet fits SHEET_MAX_BYTES
# A stored thumbnail is hostile input: one that claims more pixels than this is drawn as missing.
MAX_THUMB_PIXELS = 1024 * 1024
LOAD_THREADS = 8  # concurrent thumbnail GETs per story being built
INDEX_OVERVIEW_CHARS = 300


# --- where -----------------------------------------------------------------------------------------


def storyboard_prefix(job_id: str) -> str:
    return f"{keys.job_prefix(job_id)}storyboard/"


def storyboard_key(job_id: str) -> str:
    return f"{storyboard_prefix(job_id)}index.html"


def story_page_name(story_index: int) -> str:
    return f"story_{story_index:03d}.html"


def story_page_key(job_id: str, story_index: int) -> str:
    return storyboard_prefix(job_id) + story_page_name(story_index)


def contact_sheet_name(story_index: int, sheet: int) -> str:
    return f"contact_sheet_{story_index:03d}_{sheet:02d}.jpg"


def contact_sheet_key(job_id: str, story_index: int, sheet: int) -> str:
    return storyboard_prefix(job_id) + contact_sheet_name(story_index, sheet)


def story_manifest_key(job_id: str, story_index: int) -> str:
    return f"{storyboard_prefix(job_id)}story_{story_index:03d}.json"


def sheet_count(frame_count: int) -> int:
    return math.ceil(max(frame_count, 0) / SHEET_THUMBS)


def _frame_href(story_index: int, frame_index: int) -> str:
    return f"../stories/{story_index:03d}/frames/{frame_index:06d}.png"


def _thumb_href(story_index: int, frame_index: int) -> str:
    return f"../stories/{story_index:03d}/thumbs/{frame_index:06d}.jpg"


# --- pages -----------------------------------------------------------------------------------------

_STYLE = (
    "<style>body{font-family:system-ui,sans-serif;margin:2rem;background:#111;color:#eee}"
    "a{color:#8cf}h1,h2,h3{font-weight:600}.strip{display:flex;flex-wrap:wrap;gap:.5rem;align-items:flex-start}"
    "figure{margin:0;width:200px}figure img{width:200px;height:200px;object-fit:cover;border-radius:4px}"
    "figcaption{font-size:.7rem;color:#aaa}.dialogue{width:200px;font-style:italic;color:#fd8;"
    "padding:.5rem;border-left:3px solid #fd8}.qa{color:#8cf;font-size:.9rem}section{margin-bottom:2rem}"
    ".sheet{max-width:100%}.stories li{margin:.4rem 0}.muted{color:#aaa}"
    "</style>"
)


def _head(title: str) -> list[str]:
    return [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        _STYLE + "</head><body>",
    ]


def render_story_html(job_id: str, story_index: int, story: Story, sheets: int) -> str:
    """One story's page: its contact sheets, then every frame (thumbnail linking the PNG) in story order
    with the dialogues and QA between them."""
    e = html.escape
    s = story_index
    title = story.title or f"Story {s}"
    out = _head(f"DreamFrame storyboard — {job_id} — {title}")
    out.append(f'<p><a href="index.html">Storyboard · job {e(job_id)}</a></p>')
    out.append(f'<section id="story-{s:03d}"><h1>{e(title)}</h1>')
    out.append(f"<p>{e(story.overview)}</p>")
    if story.style_keyword:
        described = f" — {e(story.style_description)}" if story.style_description else ""
        out.append(f"<p>Style: <b>{e(story.style_keyword)}</b>{described}</p>")
    for p in range(sheets):
        first, last = p * SHEET_THUMBS, min(story.frame_count, (p + 1) * SHEET_THUMBS) - 1
        name = contact_sheet_name(s, p)
        out.append(
            f'<p><a href="{name}"><img class="sheet" src="{name}" loading="lazy" '
            f'alt="contact sheet {p + 1} of {sheets}: frames {first}–{last}"></a></p>'
        )
    out.extend(_qa_list(story.qa))
    frame_no = 0
    for u, sub in enumerate(story.substories):
        out.append(f"<h2>Part {u + 1}{': ' + e(sub.scene) if sub.scene else ''}</h2>")
        if sub.content:
            out.append(f"<p>{e(sub.content)}</p>")
        out.extend(_qa_list(sub.qa))
        for tiny in sub.tiny_stories:
            out.append('<div class="strip">')
            for item in tiny.items:
                if item.kind == "frame":
                    out.append(
                        f'<figure><a href="{_frame_href(s, frame_no)}">'
                        f'<img src="{_thumb_href(s, frame_no)}" alt="frame {frame_no}" loading="lazy"></a>'
                        f"<figcaption>#{frame_no} · {e(item.text)}</figcaption></figure>"
                    )
                    frame_no += 1
                else:
                    out.append(f'<div class="dialogue">{e(item.text)}</div>')
            out.append("</div>")
            out.extend(_qa_list(tiny.qa))
    out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


@dataclass(frozen=True)
class IndexEntry:
    story_index: int
    title: str = ""
    overview: str = ""
    frames: int = 0
    sheets: int = 0
    built: bool = True  # False: the story has no board (yet)


def render_index_html(job_id: str, entries: Sequence[IndexEntry]) -> str:
    """The job page: one line per story, linking its page."""
    e = html.escape
    out = _head(f"DreamFrame storyboard — {job_id}")
    out.append(f"<h1>Storyboard · job {e(job_id)}</h1>")
    out.append(f'<p class="muted">{len(entries)} stories</p>')
    out.append('<ol class="stories" start="0">')
    for entry in entries:
        title = e(entry.title or f"Story {entry.story_index}")
        if entry.built:
            link = f'<a href="{story_page_name(entry.story_index)}">{title}</a>'
            facts = f"{entry.frames} frames, {entry.sheets} contact sheet{'s' if entry.sheets != 1 else ''}"
        else:
            link, facts = title, "not built yet"
        overview = entry.overview[:INDEX_OVERVIEW_CHARS]
        overview += "…" if len(entry.overview) > INDEX_OVERVIEW_CHARS else ""
        out.append(
            f'<li id="story-{entry.story_index:03d}">{link} <span class="muted">· {facts}</span>'
            + (f"<br>{e(overview)}" if overview else "")
            + "</li>"
        )
    out.append("</ol>")
    out.append("</body></html>")
    return "\n".join(out)


def _qa_list(qas) -> list[str]:
    if not qas:
        return []
    items = "".join(
        f"<li><b>Q:</b> {html.escape(qa.question)} <b>A:</b> {html.escape(qa.answer)}</li>" for qa in qas
    )
    return [f'<ul class="qa">{items}</ul>']


# --- contact sheets ----------------------------------------------------------------------------------


def contact_sheet(
    thumbs: Sequence[bytes | None],
    *,
    cell: int = SHEET_CELL,
    columns: int = SHEET_COLUMNS,
    max_bytes: int = SHEET_MAX_BYTES,
) -> bytes:
    """A grid of thumbnails in order (at most ``columns`` a row; a missing or unreadable one drawn as a
    crossed box), as JPEG bytes of at most ``max_bytes``."""
    n = len(thumbs)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    sheet = Image.new("RGB", (cols * cell, rows * cell), (17, 17, 17))
    draw = ImageDraw.Draw(sheet)
    for i, data in enumerate(thumbs):
        x, y = (i % cols) * cell, (i // cols) * cell
        image = _decode_thumb(data, cell) if data is not None else None
        if image is None:
            draw.rectangle([x + 2, y + 2, x + cell - 3, y + cell - 3], outline=(120, 40, 40), width=2)
            draw.line([x + 2, y + 2, x + cell - 3, y + cell - 3], fill=(120, 40, 40), width=2)
            continue
        sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
    while True:
        for quality in SHEET_QUALITIES:
            data = thumbnails.encode_jpeg(sheet, quality=quality)
            if len(data) <= max_bytes:
                return data
        # Nothing real gets here (noise at quality 20 is half the limit); halve rather than overflow.
        sheet = sheet.resize((max(1, sheet.width // 2), max(1, sheet.height // 2)), Image.Resampling.BOX)


def _decode_thumb(data: bytes, cell: int) -> Image.Image | None:
    try:
        # No `with`: closing would discard the decoded pixels, and keeping them costs a copy per frame.
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_THUMB_PIXELS:
            return None
        image.draft("RGB", (cell, cell))  # JPEG: decode at a reduced scale when that is enough
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    size = thumbnails.fit(*rgb.size, cell)
    return rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BILINEAR)


# --- building a story's board ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoryBoard:
    page: ObjectRef
    manifest: dict
    built: bool  # False: kept from an earlier build
    thumbnails_made: int = 0  # made from a frame's PNG because the renderer had not written one


def load_thumbnail(
    store: ObjectStore, job_id: str, story_index: int, frame_index: int
) -> tuple[bytes | None, bool]:
    """(the frame's thumbnail, whether it was made now): the renderer's; else made from the frame's PNG
    and stored, once; None when the frame is missing or unreadable."""
    key = keys.frame_thumb_key(job_id, story_index, frame_index)
    try:
        return store.get_bytes(key), False
    except NotFound:
        pass
    try:
        png = store.get_bytes(keys.frame_key(job_id, story_index, frame_index))
    except NotFound:
        return None, False
    try:
        data = thumbnails.thumbnail_from_image_bytes(png)
    except ValueError as exc:
        log.warning("job %s story %d frame %d: %s", job_id, story_index, frame_index, exc)
        return None, False
    store.put_bytes(key, data, content_type=thumbnails.CONTENT_TYPE)
    return data, True


def frames_digest(listing: object) -> str:
    """The sha256 of a render listing's frames (their keys and hashes), "" when there is none: what a
    story's board was made from, independent of the counts a re-run records beside them."""
    frames = listing.get("frames") if isinstance(listing, dict) else None
    if not isinstance(frames, list):
        return ""
    return hashlib.sha256(json.dumps(frames, sort_keys=True).encode()).hexdigest()


def existing_story_board(
    store: ObjectStore, job_id: str, story_index: int, *, story_sha256: str, frames_sha256: str
) -> StoryBoard | None:
    """The board already stored for this story, when its manifest names the same story and frames and
    its page and every sheet verify; else None (build it)."""
    try:
        manifest = store.get_json(story_manifest_key(job_id, story_index))
    except NotFound:
        return None
    except ValueError:
        return None  # unreadable manifest: build again
    try:
        if (
            manifest["schema"] != MANIFEST_SCHEMA
            or manifest["story_index"] != story_index
            or manifest["story_sha256"] != story_sha256
            or manifest["frames_sha256"] != frames_sha256
        ):
            return None
        page = _ref(manifest["page"])
        sheets = [_ref(s) for s in manifest["sheets"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    expected = [story_page_key(job_id, story_index)] + [
        contact_sheet_key(job_id, story_index, p) for p in range(len(sheets))
    ]
    if [page.key] + [s.key for s in sheets] != expected or not all(store.verify(r) for r in [page, *sheets]):
        return None
    return StoryBoard(page=page, manifest=manifest, built=False)


def build_story_board(
    store: ObjectStore,
    job_id: str,
    story_index: int,
    story: Story,
    *,
    story_sha256: str,
    frames_sha256: str,
    threads: int = LOAD_THREADS,
) -> StoryBoard:
    """Contact sheets (SHEET_THUMBS thumbnails each, loaded concurrently, one sheet in memory at a time),
    then the page, then the manifest."""
    n = story.frame_count
    sheets: list[ObjectRef] = []
    made = missing = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="storyboard") as pool:
        for p in range(sheet_count(n)):
            frames = range(p * SHEET_THUMBS, min(n, (p + 1) * SHEET_THUMBS))
            loaded = list(pool.map(lambda f: load_thumbnail(store, job_id, story_index, f), frames))
            made += sum(1 for _, fresh in loaded if fresh)
            missing += sum(1 for data, _ in loaded if data is None)
            sheet = contact_sheet([data for data, _ in loaded])
            sheets.append(
                store.put_bytes(contact_sheet_key(job_id, story_index, p), sheet, content_type="image/jpeg")
            )
    page_html = render_story_html(job_id, story_index, story, len(sheets)).encode()
    page = store.put_bytes(story_page_key(job_id, story_index), page_html, content_type="text/html")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "story_index": story_index,
        "title": story.title,
        "overview": story.overview[: INDEX_OVERVIEW_CHARS + 1],
        "frames": n,
        "missing_frames": missing,
        "story_sha256": story_sha256,
        "frames_sha256": frames_sha256,
        "page": _ref_dict(page),
        "sheets": [_ref_dict(s) for s in sheets],
    }
    store.put_json(story_manifest_key(job_id, story_index), manifest)
    if made:
        log.info("job %s story %d: made %d thumbnails from frames", job_id, story_index, made)
    return StoryBoard(page=page, manifest=manifest, built=True, thumbnails_made=made)


def ensure_story_board(
    store: ObjectStore, job_id: str, story_index: int, story: ObjectRef, listing: ObjectRef | None
) -> StoryBoard:
    """The story's board: the one stored when it was made from this story and these frames, else built
    now. ``story`` is the story JSON, ``listing`` the render stage's frame listing (None or missing:
    the board is made from whatever frames are stored)."""
    keys.story_prefix(job_id, story_index)  # validates both (they name the keys written)
    data = store.get_bytes(story.key, bucket=story.bucket or None)
    parsed_listing = None
    if listing is not None:
        try:
            parsed_listing = json.loads(store.get_bytes(listing.key, bucket=listing.bucket or None))
        except (NotFound, ValueError):
            parsed_listing = None
    versions = dict(story_sha256=sha256_bytes(data), frames_sha256=frames_digest(parsed_listing))
    board = existing_story_board(store, job_id, story_index, **versions)
    if board is None:
        board = build_story_board(store, job_id, story_index, load_story(data), **versions)
    return board


def write_index(store: ObjectStore, job_id: str, stories: int, *, threads: int = LOAD_THREADS) -> ObjectRef:
    """The job page, from the stories' manifests (a story without one is listed as not built)."""

    def entry(i: int) -> IndexEntry:
        try:
            m = store.get_json(story_manifest_key(job_id, i))
            return IndexEntry(
                story_index=i,
                title=str(m.get("title") or ""),
                overview=str(m.get("overview") or ""),
                frames=int(m.get("frames") or 0),
                sheets=len(m.get("sheets") or []),
            )
        except (NotFound, ValueError, TypeError, AttributeError):
            return IndexEntry(story_index=i, built=False)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="storyboard-index") as pool:
        entries = list(pool.map(entry, range(stories)))
    page = render_index_html(job_id, entries).encode()
    return store.put_bytes(storyboard_key(job_id), page, content_type="text/html")


def _ref(value: dict) -> ObjectRef:
    return ObjectRef(str(value["bucket"]), str(value["key"]), int(value["size"]), str(value["sha256"]))


def _ref_dict(ref: ObjectRef) -> dict:
    return {"bucket": ref.bucket, "key": ref.key, "size": ref.size, "sha256": ref.sha256}
