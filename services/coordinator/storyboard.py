"""The storyboard every job ends with: a static HTML page showing the keyframes in story order with
dialogues and QA, and a contact-sheet PNG per story.

The page lives at ``jobs/<job>/storyboard/index.html`` and points at frames by relative path
(``../stories/000/frames/000000.png``), so it works in the bucket, behind any static server, and in the
``runs/<job>/`` folder the CLI exports.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Callable

from PIL import Image, ImageDraw

from dreamframe import keys
from dreamframe.story import Story

THUMB = 128


def storyboard_key(job_id: str) -> str:
    return f"{keys.job_prefix(job_id)}storyboard/index.html"


def contact_sheet_key(job_id: str, story_index: int) -> str:
    return f"{keys.job_prefix(job_id)}storyboard/contact_sheet_{story_index:03d}.png"


def _frame_href(story_index: int, frame_index: int) -> str:
    return f"../stories/{story_index:03d}/frames/{frame_index:06d}.png"


def render_html(job_id: str, stories: list[Story]) -> str:
    """The page. Plain HTML + inline CSS: no scripts, nothing fetched from elsewhere."""
    e = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>DreamFrame storyboard — {e(job_id)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;background:#111;color:#eee}"
        "h1,h2,h3{font-weight:600}.strip{display:flex;flex-wrap:wrap;gap:.5rem;align-items:flex-start}"
        "figure{margin:0;width:200px}figure img{width:200px;height:200px;object-fit:cover;border-radius:4px}"
        "figcaption{font-size:.7rem;color:#aaa}.dialogue{width:200px;font-style:italic;color:#fd8;"
        "padding:.5rem;border-left:3px solid #fd8}.qa{color:#8cf;font-size:.9rem}section{margin-bottom:2rem}"
        "</style></head><body>",
        f"<h1>Storyboard · job {e(job_id)}</h1>",
    ]
    for s, story in enumerate(stories):
        frame_no = 0
        out.append(f'<section id="story-{s:03d}"><h2>{e(story.title or f"Story {s}")}</h2>')
        out.append(f"<p>{e(story.overview)}</p>")
        if story.style_keyword:
            described = f" — {e(story.style_description)}" if story.style_description else ""
            out.append(f"<p>Style: <b>{e(story.style_keyword)}</b>{described}</p>")
        out.append(f'<p><img src="contact_sheet_{s:03d}.png" alt="contact sheet" style="max-width:100%"></p>')
        out.extend(_qa_list(story.qa))
        for u, sub in enumerate(story.substories):
            out.append(f"<h3>Part {u + 1}{': ' + e(sub.scene) if sub.scene else ''}</h3>")
            if sub.content:
                out.append(f"<p>{e(sub.content)}</p>")
            out.extend(_qa_list(sub.qa))
            for tiny in sub.tiny_stories:
                out.append('<div class="strip">')
                for item in tiny.items:
                    if item.kind == "frame":
                        src = _frame_href(s, frame_no)
                        out.append(
                            f'<figure><img src="{src}" alt="frame {frame_no}" loading="lazy">'
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


def _qa_list(qas) -> list[str]:
    if not qas:
        return []
    items = "".join(
        f"<li><b>Q:</b> {html.escape(qa.question)} <b>A:</b> {html.escape(qa.answer)}</li>" for qa in qas
    )
    return [f'<ul class="qa">{items}</ul>']


def contact_sheet(
    frame_count: int, load_frame: Callable[[int], bytes | None], *, thumb: int = THUMB
) -> bytes:
    """A grid of every frame's thumbnail in order (missing frames drawn as a crossed box), as PNG bytes."""
    cols = max(1, math.ceil(math.sqrt(max(frame_count, 1))))
    rows = max(1, math.ceil(frame_count / cols))
    sheet = Image.new("RGB", (cols * thumb, rows * thumb), (17, 17, 17))
    draw = ImageDraw.Draw(sheet)
    for i in range(frame_count):
        x, y = (i % cols) * thumb, (i // cols) * thumb
        data = load_frame(i)
        if data is None:
            draw.rectangle([x + 2, y + 2, x + thumb - 3, y + thumb - 3], outline=(120, 40, 40), width=2)
            draw.line([x + 2, y + 2, x + thumb - 3, y + thumb - 3], fill=(120, 40, 40), width=2)
            continue
        with Image.open(io.BytesIO(data)) as image:
            sheet.paste(image.convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR), (x, y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
