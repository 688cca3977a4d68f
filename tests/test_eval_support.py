"""Helpers shared by the evaluator tests (no tests here): tiny videos and frames written with PyAV/PIL, a
LocalStore, benchmark fixture files in each benchmark's own format, and a scripted OpenAI-protocol HTTP
server on 127.0.0.1 that plays both a vision model under test and an LLM judge."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
from PIL import Image

RED = (220, 30, 30)
BLUE = (30, 30, 220)
GREEN = (30, 200, 30)


def make_store(tmp_path):
    from dreamframe.storage import LocalStore

    return LocalStore(tmp_path / "store", "dreamframe")


def mp4_bytes(colours: list[tuple[int, int, int]], *, size: int = 32, fps: int = 4, seed: int = 0) -> bytes:
    """An mp4 with one solid-ish frame per colour (a little noise so the encoder has texture)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps, 1))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for colour in colours:
            pixels = np.clip(np.array(colour) + rng.integers(-8, 8, (size, size, 3)), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def png_bytes(colour: tuple[int, int, int], *, size: int = 32, noise: int = 30, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-noise, noise, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def dominant(image: Image.Image) -> str:
    r, g, b = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    return "red" if r >= max(g, b) else "blue" if b >= g else "green"


# --- benchmark fixtures, in each benchmark's own file format ---------------------------------------------
def write_mvbench(store, root: str = "bench/mvbench") -> dict:
    """Two task files; the right answer is the video's colour. One item's video is missing, one has no
    candidates, one an answer that is not a candidate; one uses start/end to pick the blue half."""
    store.put_bytes(f"{root}/video/star/Charades_v1_480/red.mp4", mp4_bytes([RED] * 8))
    store.put_bytes(f"{root}/video/clevrer/video_validation/blue.mp4", mp4_bytes([BLUE] * 8))
    # 8 frames at 4 fps: red for 0-1 s, blue for 1-2 s.
    store.put_bytes(f"{root}/video/star/Charades_v1_480/halves.mp4", mp4_bytes([RED] * 4 + [BLUE] * 4))
    colour_q = "What colour fills the video?"
    store.put_json(
        f"{root}/json/action_sequence.json",
        [
            {"video": "red.mp4", "question": colour_q, "candidates": ["red", "blue"], "answer": "red"},
            {
                "video": "halves.mp4",
                "question": colour_q,
                "candidates": ["red", "blue"],
                "answer": "blue",
                "start": 1.1,
                "end": 2.0,
            },
            {
                "video": "halves.mp4",
                "question": colour_q,
                "candidates": ["blue", "red"],
                "answer": "red",
                "start": 0.0,
                "end": 0.9,
            },
            {"video": "missing.mp4", "question": colour_q, "candidates": ["red", "blue"], "answer": "red"},
        ],
    )
    store.put_json(
        f"{root}/json/moving_direction.json",
        [
            {
                "video": "blue.mp4",
                "question": colour_q,
                "candidates": ["red", "blue", "green"],
                "answer": "blue",
            },
            {"video": "blue.mp4", "question": colour_q, "candidates": [], "answer": "blue"},
            {"video": "blue.mp4", "question": colour_q, "candidates": ["red", "green"], "answer": "blue"},
        ],
    )
    return {"data_prefix": f"{root}/json", "items": 4, "errors": 3}


def write_tempcompass(store, root: str = "bench/tempcompass") -> dict:
    store.put_bytes(f"{root}/videos/v_red.mp4", mp4_bytes([RED] * 6))
    store.put_bytes(f"{root}/videos/v_blue.mp4", mp4_bytes([BLUE] * 6))
    mc = {
        "v_red": {"action": [{"question": "What colour is shown?\nA. red\nB. blue", "answer": "A. red"}]},
        "v_blue": {"speed": [{"question": "What colour is shown?\nA. red\nB. blue", "answer": "B. blue"}]},
        "v_gone": {"action": [{"question": "What colour is shown?\nA. red\nB. blue", "answer": "A. red"}]},
    }
    store.put_json(f"{root}/questions/multi-choice.json", mc)
    store.put_json(
        f"{root}/questions/yes_no.json",
        {
            "v_red": {"action": [{"question": "Is the video red?", "answer": "yes"}]},
            "v_blue": {"speed": [{"question": "Is the video red?", "answer": "no"}]},
        },
    )
    store.put_json(
        f"{root}/questions/caption_matching.json",
        {
            "v_red": {
                "action": [
                    {
                        "question": "Which caption matches the video better?\n"
                        "Caption A: A red video.\nCaption B: A blue video.",
                        "answer": "Caption A: A red video.",
                    }
                ]
            }
        },
    )
    store.put_json(
        f"{root}/questions/captioning.json",
        {
            "v_blue": {
                "speed": [
                    {
                        "question": "Generate a caption.\nInformation A: {'colour': 'red'}\nInformation B: "
                        "{'colour': 'blue'}\nGenerated Caption:",
                        "answer": "B. blue",
                    }
                ]
            }
        },
    )
    return {"data_prefix": f"{root}/questions", "items": 6, "errors": 1}


def write_videobench(store, root: str = "bench/videobench") -> dict:
    store.put_bytes(f"{root}/Eval_video/MSVD/red.mp4", mp4_bytes([RED] * 6))
    store.put_bytes(f"{root}/Eval_video/MOT/blue.mp4", mp4_bytes([BLUE] * 6))
    choices = {"A": "red", "B": "blue", "C": "green", "D": "black"}
    store.put_json(
        f"{root}/Eval_QA/MSVD_QA_new.json",
        {
            "0": {
                "vid_path": "Eval_video/MSVD/red.mp4",
                "video_id": "red",
                "question": "Which colour?",
                "choices": choices,
                "answer": "A",
            },
            "1": {
                "vid_path": "Eval_video/MSVD/none.mp4",
                "video_id": "none",
                "question": "Which colour?",
                "choices": choices,
                "answer": "A",
            },
        },
    )
    store.put_json(
        f"{root}/Eval_QA/MOT_QA_new.json",
        {
            "0": {
                "vid_path": "Eval_video/MOT/blue.mp4",
                "video_id": "blue",
                "question": "Which colour?",
                "choices": choices,
                "answer": "B",
            },
            "1": {
                "vid_path": "Eval_video/MOT/blue.mp4",
                "video_id": "blue",
                "question": "Which colour?",
                "choices": {},
                "answer": "B",
            },
        },
    )
    store.put_json(
        f"{root}/Eval_QA/TVQA_QA_new.json",
        {
            "0": {
                "vid_path": "Eval_video/MOT/blue.mp4",
                "video_id": "blue",
                "question": "Which colour?",
                "choices": choices,
                "answer": "blue",
            }
        },
    )
    return {"data_prefix": f"{root}/Eval_QA", "items": 3, "errors": 2}


def write_videochatgpt(store, root: str = "bench/vcgpt") -> dict:
    """Generic, temporal and consistency questions. "[flaky]" in a question makes the fake judge answer
    malformed once; "[broken]" makes it answer malformed every time (a failure)."""
    store.put_bytes(f"{root}/videos/v_red.mp4", mp4_bytes([RED] * 6))
    store.put_bytes(f"{root}/videos/v_blue.mp4", mp4_bytes([BLUE] * 6))
    store.put_json(
        f"{root}/generic_qa.json",
        [
            {"video_name": "v_red", "Q": "What colour is it?", "A": "It is red."},
            {"video_name": "v_blue", "Q": "What colour is it? [flaky]", "A": "It is blue."},
        ],
    )
    store.put_json(
        f"{root}/temporal_qa.json",
        [
            {"video_name": "v_red", "Q": "What happens first? [broken]", "A": "Red stays red."},
            {"video_name": "v_nowhere", "Q": "What happens first?", "A": "Nothing."},
        ],
    )
    store.put_json(
        f"{root}/consistency_qa.json",
        [{"video_name": "v_blue", "Q1": "Which colour?", "Q2": "What is the colour?", "A": "Blue."}],
    )
    return {"data_prefix": root, "items": 4, "errors": 1}


def write_dreamframe_mc(store, root: str = "datasets/demo") -> dict:
    store.put_bytes(f"{root}/videos/s0.mp4", mp4_bytes([RED] * 6))
    frame_keys = []
    for i in range(5):
        key = f"jobs/demo/stories/000/frames/{i:06d}.png"
        store.put_bytes(key, png_bytes(BLUE, seed=i))
        frame_keys.append(key)
    store.put_json(
        f"{root}/test/multiple_choice.json",
        [
            {
                "id": "s0_q0",
                "task": "tiny_story/what",
                "video": "videos/s0.mp4",
                "question": "Which colour?",
                "candidates": ["blue", "red"],
                "answer": "red",
            },
            {
                "id": "s0_q1",
                "task": "tiny_story/where",
                "frames": frame_keys,
                "question": "Which colour?",
                "candidates": ["red", "blue"],
                "answer": "blue",
            },
        ],
    )
    # A conversation file in the same folder must be ignored by the MC loader.
    store.put_json(
        f"{root}/test/conversations.json", [{"id": "x", "video": "videos/s0.mp4", "conversations": []}]
    )
    return {"data_prefix": f"{root}/test", "items": 2, "errors": 0}


def write_story_frames(store, prefix: str, colour, count: int = 5, seed: int = 0) -> str:
    for i in range(count):
        store.put_bytes(f"{prefix}{i:06d}.png", png_bytes(colour, seed=seed * 100 + i))
    return prefix


# --- a scripted OpenAI-protocol server -------------------------------------------------------------------
def _images(messages: list[dict]) -> list[Image.Image]:
    images = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    data = part["image_url"]["url"].split(",", 1)[1]
                    images.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return images


def _text(messages: list[dict]) -> str:
    chunks = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chunks.append(content)
        elif isinstance(content, list):
            chunks += [p.get("text", "") for p in content if p.get("type") == "text"]
    return "\n".join(chunks)


def scripted_reply(body: dict, seen: Counter) -> str:
    """What the fake server answers: as a vision model, the colour it sees; as a judge, by the prompt."""
    messages = body["messages"]
    text = _text(messages)
    images = _images(messages)
    if images:  # the model under test
        colour = Counter(dominant(img) for img in images).most_common(1)[0][0]
        options = re.findall(r"^\(([A-Z])\) (\w+)$", text, flags=re.MULTILINE)
        if options:  # MVBench-style: answer the option whose text is the colour
            letter = next((opt for opt, label in options if label == colour), "A")
            return f"({letter}) {colour}"
        if "Please answer yes or no" in text:
            return "yes" if colour == "red" else "no"
        if "Please directly give the best option" in text:
            lines = [line for line in text.split("\n") if colour in line.lower()]
            return lines[0].split(". ")[0].split(": ")[0] if lines else "I am not sure"
        if "closest to the correct answer" in text:
            return f"I think it is {colour}."
        return f"The video is {colour}."
    key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    seen[key] += 1
    if "keys 'score'" in text:
        if "[broken]" in text or ("[flaky]" in text and seen[key] == 1):
            return "The answer deserves a four."  # malformed: not a dict
        return "{'score': 4}" if "red" in text.split("Predicted Answer")[-1] else "{'score': 2}"
    if "maximum probability" in text:
        match = re.search(r"'target sequcene': '([^']*)'", text)
        target = match.group(1) if match else ""
        letter = "A" if "red" in target else "B" if "blue" in target else "C"
        return f'{{"maximum probability": "{letter}"}}'
    if 'respond "Correct"' in text:
        prediction = text.rsplit("Model Prediction:", 1)[-1]
        answer = text.rsplit("Ground-Truth Answer:", 1)[-1].split("\n")[0]
        return "Correct" if any(w in prediction for w in answer.split() if len(w) > 2) else "Incorrect"
    if "Video Description:" in text:
        caption = text.rsplit("Video Description:", 1)[-1].split("\n")[0]
        return "Reasoning: from the caption.\nAnswer: " + ("B. blue" if "blue" in caption else "A. red")
    return "I cannot help with that."


class FakeOpenAI:
    """ThreadingHTTPServer on 127.0.0.1:0 answering POST /v1/chat/completions with ``reply(body, seen)``."""

    def __init__(self, reply: Callable[[dict, Counter], str] = scripted_reply) -> None:
        self.reply = reply
        self.requests: list[dict] = []
        self.seen: Counter = Counter()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(body)
                    content = fake.reply(body, fake.seen)
                payload = json.dumps(
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "fake"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def vision_requests(self) -> list[dict]:
        return [r for r in self.requests if _images(r["messages"])]

    def judge_requests(self) -> list[dict]:
        return [r for r in self.requests if not _images(r["messages"])]

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
