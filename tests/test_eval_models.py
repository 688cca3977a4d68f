"""The models under test and the judge: a tiny random LLaVA checkpoint (letter logits after "Best option:("),
an OpenAI-compatible vision endpoint and judge served by a local scripted HTTP server."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_eval_support import BLUE, RED, FakeOpenAI, make_store, png_bytes

from dreamframe.errors import FailedPrecondition, InvalidArgument
from dreamframe.models import video_llm
from services.evaluator.cache import ResultCache
from services.evaluator.endpoints import Endpoint, resolve_judge, resolve_model_endpoint
from services.evaluator.judge import make_judge
from services.evaluator.models import checkpoint_identity, load_checkpoint_model, make_endpoint_model
from services.evaluator.prompts import MVBENCH_ANSWER_PREFIX, mvbench_user_prompt
from services.evaluator.request import EndpointSpec
from services.evaluator.settings import EvaluatorSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = video_llm.resolve_model_path("tiny", {}, tmp_path_factory.mktemp("models"))
    return load_checkpoint_model(path, "preset:tiny", device="cpu")


def frames(colour, n=3):
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(png_bytes(colour, seed=i))).convert("RGB") for i in range(n)]


def test_checkpoint_choice_is_the_best_scoring_letter(tiny) -> None:
    candidates = ["red", "blue", "green", "black"]
    prompt = mvbench_user_prompt("What colour is the video?", candidates)
    choice = tiny.choose(frames(RED), prompt, candidates, prefix=MVBENCH_ANSWER_PREFIX)
    assert choice.method == "letter_logits" and choice.letter in "ABCD"
    assert (
        tiny.choose(frames(RED), prompt, candidates, prefix=MVBENCH_ANSWER_PREFIX) == choice
    )  # deterministic

    # Independently: the log-probability of each letter right after the pre-filled prefix.
    messages = video_llm.conversation(frames(RED), [(prompt, MVBENCH_ANSWER_PREFIX)])
    inputs = tiny.processor.apply_chat_template(
        [messages], tokenize=True, return_dict=True, continue_final_message=True, return_tensors="pt"
    )
    with torch.no_grad():
        last = torch.log_softmax(tiny.model(**inputs).logits[0, -1], -1)
    tok = tiny.processor.tokenizer
    scores = {letter: float(last[tok.convert_tokens_to_ids(letter)]) for letter in "ABCD"}
    assert choice.letter == max(scores, key=scores.get)


def test_checkpoint_answer_continues_the_prefix(tiny) -> None:
    text = tiny.answer(frames(BLUE), "Describe the video.", max_new_tokens=5)
    expected = video_llm.generate(
        tiny.model, tiny.processor, frames(BLUE), "Describe the video.", max_new_tokens=5
    )
    assert text == expected


def test_checkpoint_identity_follows_the_files(tmp_path) -> None:
    store = make_store(tmp_path)
    store.put_bytes("runs/r1/final/config.json", b'{"a": 1}')
    store.put_bytes("runs/r1/final/model.safetensors", b"x" * 10)
    first, files = checkpoint_identity(store, "runs/r1/final")
    assert [(f.key, f.size) for f in files] == [
        ("runs/r1/final/config.json", 8),
        ("runs/r1/final/model.safetensors", 10),
    ]
    store.put_bytes("runs/r1/final/config.json", b'{"a": 2}')  # same size, new content
    assert checkpoint_identity(store, "runs/r1/final")[0] != first
    with pytest.raises(Exception, match="no checkpoint files"):
        checkpoint_identity(store, "runs/none")


def test_endpoint_model_sends_frames_as_images() -> None:
    with FakeOpenAI() as fake:
        model = make_endpoint_model(Endpoint(fake.base_url, "vision", ""), timeout=10)
        candidates = ["green", "blue", "red"]
        choice = model.choose(
            frames(BLUE, 4), mvbench_user_prompt("Colour?", candidates), candidates, prefix="Best option:("
        )
        assert choice.letter == "B" and choice.method == "generated"
        request = fake.vision_requests()[0]
        parts = request["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["image_url"] * 4 + ["text"]
        assert parts[-1]["text"].endswith("Best option:(")
        assert request["model"] == "vision" and request["temperature"] == 0
        model.close()


def test_judge_retries_malformed_answers_then_counts_a_failure(tmp_path) -> None:
    replies = {"flaky": ["no dict here", "{'score': 3}"], "broken": ["nope"] * 10}

    def reply(body: dict, seen: Counter) -> str:
        text = body["messages"][-1]["content"]
        kind = "flaky" if "[flaky]" in text else "broken"
        seen[kind] += 1
        return replies[kind][seen[kind] - 1]

    store = make_store(tmp_path)
    with FakeOpenAI(reply) as fake:
        judge = make_judge(
            Endpoint(fake.base_url, "j", ""), max_attempts=3, timeout=10, cache=ResultCache(store)
        )
        flaky = judge.score("correctness", {"Q": "Q [flaky]", "A": "a", "pred": "p"})
        assert (flaky.value, flaky.attempts) == (3.0, 2)
        broken = judge.score("temporal_understanding", {"Q": "Q", "A": "a", "pred": "p"})
        assert broken.value is None and broken.attempts == 3 and "malformed" in broken.error
        assert judge.calls == 5
        # Cached: asking again costs nothing for the good verdict; the failure is asked again.
        again = judge.score("correctness", {"Q": "Q [flaky]", "A": "a", "pred": "p"})
        assert again.value == 3.0 and again.cached and judge.calls == 5
        assert judge.score("temporal_understanding", {"Q": "Q", "A": "a", "pred": "p"}).value is None
        assert judge.calls == 8 and len(fake.requests) == 8


def test_judge_sees_the_benchmark_prompts(tmp_path) -> None:
    with FakeOpenAI() as fake:
        judge = make_judge(Endpoint(fake.base_url, "j", ""), max_attempts=2, timeout=10, cache=None)
        verdict = judge.score(
            "consistency", {"Q1": "one?", "Q2": "two?", "A": "red", "pred1": "red", "pred2": "red"}
        )
        assert verdict.value == 4.0
        user = fake.requests[-1]["messages"][-1]["content"]
        assert "Question 1: one?" in user and "Question 2: two?" in user  # Q2 is really the second question
        assert judge.map_choice("Which? A.red B.blue", "it was blue", ["A", "B"]).value == "B"
        assert judge.is_correct("yes_no", "Is it red?", "yes", "it's red for sure").value is False
        assert judge.answer_from_caption("A blue video.", "Colour?\nA. red\nB. blue", "B. blue").value == 1


def test_endpoints_resolve_from_the_server_settings_only(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DF_TEST_ABSENT_KEY", raising=False)
    settings = EvaluatorSettings(
        allow_caller_endpoints=True,
        endpoints={"keyless": {"base_url": "http://e/v1", "model": "m", "api_key_env": "DF_TEST_ABSENT_KEY"}},
        judges={
            "j": {
                "base_url": "http://j/v1",
                "model": "a",
                "models": ["b"],
                "api_key_file": str(tmp_path / "k"),
            }
        },
        judge_base_url="http://default/v1",
        judge_api_key="default-key",
    )
    (tmp_path / "k").write_text("judge-key\n")
    assert resolve_judge(EndpointSpec(name="j", model="b"), settings) == Endpoint(
        "http://j/v1", "b", "judge-key", "j"
    )
    assert resolve_judge(None, settings) == Endpoint(
        "http://default/v1", "gpt-4o-mini", "default-key", "default"
    )
    caller = resolve_judge(EndpointSpec(base_url="http://mine/v1"), settings)
    assert caller.api_key is None and caller.model == "gpt-4o-mini"
    bad = [
        (EndpointSpec(name="j", base_url="http://mine/v1"), "judge"),
        (EndpointSpec(), "judge.name"),
        (EndpointSpec(base_url="file:///etc/passwd", model="m"), "judge.base_url"),
        (EndpointSpec(base_url="http://[::1/v1", model="m"), "judge.base_url"),
        (EndpointSpec(name="j", model="c"), "judge.model"),
    ]
    for spec, field in bad:
        with pytest.raises(InvalidArgument) as info:
            resolve_judge(spec, settings)
        assert info.value.field == field, spec
    # A configured key missing on the server: the caller is not told where it was looked for.
    with pytest.raises(FailedPrecondition) as info:
        resolve_model_endpoint(EndpointSpec(name="keyless"), settings, field="models[0].endpoint")
    assert "DF_TEST_ABSENT_KEY" not in str(info.value) and "keyless" in str(info.value)


def test_a_checkpoint_download_that_cannot_fit_fails_before_its_first_byte(tmp_path, monkeypatch) -> None:
    from collections import namedtuple

    from dreamframe import disk_space
    from dreamframe.errors import ResourceExhausted
    from services.evaluator.models import fetch_checkpoint_files

    store = make_store(tmp_path)
    store.put_bytes("runs/r1/final/model.safetensors", b"x" * 4096)
    _, files = checkpoint_identity(store, "runs/r1/final")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 10 << 20))
    # Hard links into a local store on the same disk cost nothing: no check, the files arrive.
    fetch_checkpoint_files(store, "runs/r1/final", files, tmp_path / "linked")
    assert (tmp_path / "linked" / "model.safetensors").read_bytes() == b"x" * 4096
    # A store elsewhere (S3) downloads them: 10 MiB free cannot hold the files and the headroom.
    monkeypatch.setattr(store, "shares_disk_with", lambda path: False)
    with pytest.raises(ResourceExhausted) as err:
        fetch_checkpoint_files(store, "runs/r1/final", files, tmp_path / "copied")
    assert err.value.field == "evaluator.work_dir" and "'runs/r1/final'" in err.value.message
    assert not (tmp_path / "copied").exists()
