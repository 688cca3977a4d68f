"""A local server that speaks the OpenAI chat-completions protocol and answers plot-llm's three kinds of
request with scripted, sensible stories — for the tests and the benchmark (no paid API, no GPU).

It reads what it must write from the request's JSON Schema (the counts, the allowed places, names and
the dialogue range), as a well-behaved LLM would, and can misbehave on purpose:
- ``invalid_answers={"Level1Answer": n, ...}``: the first n answers of that kind are unusable — level 1
  drops a required field, level 2 is cut-off JSON, level 3 names a person who is not in the story;
- ``rate_limited=n``: the first n requests get HTTP 429 (with retry-after-ms), as a busy endpoint does;
- ``json_schema_supported=False``: ``response_format: json_schema`` is refused with HTTP 400, like
  servers that only do ``json_object``;
- ``latency``: seconds each answer takes (the benchmark's stand-in for a real LLM).

Run alone: ``python -m services.plot_llm.scripted_server --port 8000 --latency 0.5``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import typer

from dreamframe import commandline

PLACES = (
    "the old harbour",
    "the lighthouse",
    "a quiet kitchen",
    "the train station",
    "the market square",
    "a rooftop garden",
    "the village school",
    "a forest path",
    "the town library",
    "a small bakery",
    "the river bank",
    "a hospital ward",
    "the city park",
    "a hotel lobby",
    "the mountain hut",
    "a busy office",
)
CAST = (
    ("Tom", "man", "Tom Hanks", "blue"),
    ("Anna", "woman", "Emma Stone", "red"),
    ("Leo", "boy", "Finn Wolfhard", "green"),
    ("Mia", "girl", "Millie Bobby Brown", "yellow"),
)


class ScriptedChatServer:
    """``with ScriptedChatServer() as server: server.base_url`` → ``http://127.0.0.1:<port>/v1``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        invalid_answers: dict[str, int] | None = None,
        rate_limited: int = 0,
        json_schema_supported: bool = True,
        models: tuple[str, ...] = ("scripted",),
        keep_bodies: bool = True,
    ) -> None:
        self.latency = latency
        self.invalid_answers = dict(invalid_answers or {})
        self.rate_limited = rate_limited
        self.json_schema_supported = json_schema_supported
        self.models = models
        # Tests read the request bodies; a long-lived server (plot-llm's "scripted" backend) keeps only
        # each request's kind and status, so a thousand-story job does not hold every schema sent.
        self.keep_bodies = keep_bodies
        # Every request received, in order: {"body": ..., "status": ..., "kind": ...}.
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._served: Counter[str] = Counter()
        # Answers being written right now, and the most at once (how parallel the client was).
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd = _HTTPServer((host, port), _handler(self))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ScriptedChatServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="scripted-llm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ScriptedChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answered(self, kind: str | None = None) -> int:
        """Requests answered with HTTP 200 (of one answer kind, e.g. "Level3Answer")."""
        return sum(1 for r in self.requests if r["status"] == 200 and (kind is None or r["kind"] == kind))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests": len(self.requests),
                "answered": self.answered(),
                "max_in_flight": self.max_in_flight,
            }

    # --- one request -------------------------------------------------------------------------------------
    def respond(self, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        fmt = body.get("response_format") or {}
        schema = _schema_of(body)
        kind = schema.get("title", "") if schema else ""
        record = {"body": body if self.keep_bodies else None, "kind": kind, "status": 200}
        with self._lock:
            self.requests.append(record)
            if self.rate_limited > 0:
                self.rate_limited -= 1
                record["status"] = 429
                return (
                    429,
                    {"retry-after-ms": "5"},
                    _error("Rate limit reached, retry shortly", "rate_limit_exceeded"),
                )
            if body.get("model") not in self.models:
                record["status"] = 404
                return 404, {}, _error(f"The model {body.get('model')!r} does not exist", "model_not_found")
            if fmt.get("type") == "json_schema" and not self.json_schema_supported:
                record["status"] = 400
                return (
                    400,
                    {},
                    _error("response_format type 'json_schema' is not supported", "invalid_request_error"),
                )
            if not schema:
                record["status"] = 400
                return 400, {}, _error("no JSON schema found in the request", "invalid_request_error")
            broken = self.invalid_answers.get(kind, 0) > 0
            if broken:
                self.invalid_answers[kind] -= 1
            self._served[kind] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
            text = _answer(kind, schema, broken=broken)
        finally:
            with self._lock:
                self.in_flight -= 1
        return 200, {}, _completion(body.get("model", ""), text)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # listen() backlog, fixed when the socket is bound: a burst of 100+ new connections (the benchmark)
    # overflows the default of 5, and the kernel's SYN retry then costs each of them a second.
    request_queue_size = 1024


def _handler(server: ScriptedChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {}, _error(f"no route {self.path}", "not_found"))
            try:
                body = json.loads(raw)
            except ValueError:
                return self._send(400, {}, _error("body is not JSON", "invalid_request_error"))
            self._send(*server.respond(body))

        def do_GET(self) -> None:  # noqa: N802
            if (
                self.path.rstrip("/") == "/stats"
            ):  # not OpenAI's: lets a benchmark in another process read counts
                return self._send(200, {}, server.stats())
            if self.path.rstrip("/") == "/v1/models":
                data = [{"id": m, "object": "model", "owned_by": "scripted"} for m in server.models]
                return self._send(200, {}, {"object": "list", "data": data})
            self._send(404, {}, _error(f"no route {self.path}", "not_found"))

        def _send(self, status: int, headers: dict[str, str], payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # quiet: tests and benchmarks print their own
            pass

    return Handler


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "code": code, "param": None}}


def _completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _schema_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The answer's schema: from response_format (json_schema), else the last JSON line of the prompt."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return fmt.get("json_schema", {}).get("schema")
    for message in body.get("messages", []):
        if message.get("role") != "user":
            continue
        for line in reversed(str(message.get("content", "")).splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
    return None


# --- scripted answers ------------------------------------------------------------------------------------


def _deref(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        return schema["$defs"][ref.rsplit("/", 1)[-1]]
    return node


def _choices(node: dict[str, Any]) -> list[Any]:
    return list(node["enum"]) if "enum" in node else [node["const"]]


def _array_item(schema: dict[str, Any], array: dict[str, Any]) -> dict[str, Any]:
    return _deref(schema, array["items"])


def _qa_set(topic: str, who: str, place: str) -> dict[str, Any]:
    return {
        "what": {"question": f"What happens {topic}?", "answer": f"{who} makes a hard choice."},
        "why": {"question": f"Why does it matter {topic}?", "answer": "Because the family is at stake."},
        "how": {"question": f"How does {who} act {topic}?", "answer": "Slowly and with care."},
        "where": {"question": f"Where does it happen {topic}?", "answer": f"At {place}."},
    }


def _answer(kind: str, schema: dict[str, Any], *, broken: bool) -> str:
    props = schema["properties"]
    if kind == "Level1Answer":
        n_sub = props["substories"]["minItems"]
        n_places = props["locations"]["minItems"]
        n_cast = min(2, props["characters"]["maxItems"])
        places = [
            PLACES[i % len(PLACES)] + (f" {i // len(PLACES) + 1}" if i >= len(PLACES) else "")
            for i in range(n_places)
        ]
        cast = CAST[:n_cast]
        names = " and ".join(c[0] for c in cast)
        answer: dict[str, Any] = {
            "title": "The Last Letter",
            "overview": f"{names} find an old letter and follow it across town to an unexpected reunion.",
            "style_keyword": "Dramatic",
            "style_description": "Dramatic light with deep shadows and warm highlights.",
            "locations": places,
            "characters": [{"name": n, "gender": g, "looks_like": c, "colour": col} for n, g, c, col in cast],
            "qa": _qa_set("in the story", cast[0][0], places[0]),
            "substories": [
                {
                    "scene": f"{places[i % len(places)]} in the evening",
                    "content": f"Part {i + 1}: {cast[0][0]} follows the letter to the next clue.",
                    "qa": _qa_set(f"in part {i + 1}", cast[0][0], places[i % len(places)]),
                }
                for i in range(n_sub)
            ],
        }
        if broken:
            del answer["substories"]
        return json.dumps(answer)
    if kind == "Level2Answer":
        tiny = _array_item(schema, props["tiny_stories"])
        names = _choices(tiny["properties"]["characters"]["items"])
        n = props["tiny_stories"]["minItems"]
        answer = {
            "tiny_stories": [
                {
                    "content": f"Moment {i + 1}: {names[i % len(names)]} finds a new clue.",
                    "characters": [names[i % len(names)]],
                }
                for i in range(n)
            ],
            "qa": _qa_set("in these moments", names[0], "the town"),
        }
        text = json.dumps(answer)
        return text[: len(text) // 2] if broken else text
    if kind == "Level3Answer":
        frame = _array_item(schema, props["frames"])["properties"]
        places, names, actions = (
            _choices(frame["location"]),
            _choices(frame["character"]),
            _choices(frame["action"]),
        )
        n_frames, n_lines, n_qa = (props[k]["minItems"] for k in ("frames", "dialogues", "qa"))
        last = (
            _array_item(schema, props["dialogues"])["properties"]["after_frame"]["maximum"] if n_lines else 1
        )
        answer = {
            "frames": [
                {
                    "location": places[i % len(places)],
                    "character": names[i % len(names)],
                    "action": actions[i % len(actions)],
                    "detail": f"near the window in moment {i + 1}",
                }
                for i in range(n_frames)
            ],
            "dialogues": [
                {
                    "after_frame": 1 + i % last,
                    "speaker": names[i % len(names)],
                    "line": f"We are close now, step {i + 1}.",
                }
                for i in range(n_lines)
            ],
            "qa": [
                {
                    "question": f"What does {names[0]} do in frame {i + 1}?",
                    "answer": f"{names[0]} is {actions[i % len(actions)]}.",
                }
                for i in range(n_qa)
            ],
        }
        if broken and answer["frames"]:
            answer["frames"][0]["detail"] = "next to Zorro the stranger"
        return json.dumps(answer)
    return json.dumps({})


app = typer.Typer(add_completion=False)


@app.command(help=__doc__.split("\n\n")[0])
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    latency: Annotated[float, typer.Option()] = 0.0,
    model: Annotated[str, typer.Option()] = "scripted",
) -> None:
    server = ScriptedChatServer(host=host, port=port, latency=latency, models=(model,))
    # The URL on its own line first: a parent process that started us with --port 0 reads it.
    print(server.base_url, flush=True)
    print(f"serving the OpenAI chat-completions protocol (model {model!r}); Ctrl-C stops", flush=True)
    server.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve until Ctrl-C, with these command-line arguments (default: the process's)."""
    commandline.run(app, argv)


if __name__ == "__main__":
    main()
