"""The models under test, behind one small interface (``VideoQAModel``):

- ``CheckpointModel``: a LLaVA-style checkpoint loaded with ``dreamframe.models.video_llm`` (a trainer
  run's prefix in storage, downloaded once, or a preset such as ``tiny``). Multiple choice is scored
  from the logits of the option letters right after the pre-filled answer prefix ("Best option:("): the
  same choice MVBench reads from the first generated token, but deterministic and one forward pass.
- ``EndpointModel``: any OpenAI-compatible vision chat endpoint (frames as base64 ``image_url`` parts).
  An endpoint cannot pre-fill the answer turn, so the prefix ends the user message instead and the
  option is read from the reply with MVBench's rule.
- ``PredictionsModel``: no model at all: answers shipped inside the benchmark files (Video-ChatGPT
  predictions ``{video_name, Q, A, pred}``), so a new judge can score existing predictions.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from dreamframe.disk_space import gib, require_free
from dreamframe.errors import FailedPrecondition, NotFound
from dreamframe.models import build_once
from dreamframe.storage.base import ObjectInfo, ObjectStore

from .endpoints import Endpoint, openai_client
from .extract import mvbench_letter, option_letters


@dataclass(frozen=True)
class Choice:
    """A multiple-choice answer: the letter (None: the output named no option), the raw text or the
    letter scores it came from, and how it was obtained."""

    letter: str | None
    raw: str
    method: str

    def to_json(self) -> dict:
        return {"letter": self.letter, "raw": self.raw, "method": self.method}


class VideoQAModel(Protocol):
    """What the benchmarks need from a model under test."""

    # Stable identity: answer-cache keys depend on it (a different checkpoint never reuses answers).
    identity: str

    def answer(
        self, frames: Sequence[Image.Image], prompt: str, *, prefix: str = "", max_new_tokens: int
    ) -> str:
        """Free-form answer to ``prompt`` about the frames; with ``prefix`` the answer turn starts with it
        and the returned text is what follows."""
        ...

    def choose(
        self, frames: Sequence[Image.Image], prompt: str, candidates: list[str], *, prefix: str
    ) -> Choice:
        """Pick one of ``candidates`` (options A, B, ... in order) for ``prompt`` about the frames."""
        ...

    def close(self) -> None: ...


# --- checkpoints ------------------------------------------------------------------------------------------
class CheckpointModel:
    def __init__(self, model, processor, identity: str) -> None:
        self.model = model
        self.processor = processor
        self.identity = identity

    def answer(
        self, frames: Sequence[Image.Image], prompt: str, *, prefix: str = "", max_new_tokens: int
    ) -> str:
        from dreamframe.models.video_llm import generate

        return generate(
            self.model, self.processor, frames, prompt, max_new_tokens=max_new_tokens, answer_prefix=prefix
        )

    def _encode(self, text: str, frames: Sequence[Image.Image]) -> dict:
        # The rendered chat text already holds BOS and one <image> per frame.
        from dreamframe.models.video_llm import model_inputs

        enc = self.processor(text=text, images=list(frames), return_tensors="pt", add_special_tokens=False)
        return model_inputs(self.model, enc)

    @torch.inference_mode()
    def choose(
        self, frames: Sequence[Image.Image], prompt: str, candidates: list[str], *, prefix: str
    ) -> Choice:
        from dreamframe.models.video_llm import conversation

        letters = option_letters(len(candidates))
        messages = conversation(frames, [(prompt, prefix)])
        rendered = self.processor.apply_chat_template([messages], tokenize=False, continue_final_message=True)
        text = rendered[0] if isinstance(rendered, list) else rendered
        tok = self.processor.tokenizer
        # Text-only token ids of text+letter per letter (image placeholders not yet expanded): the shared
        # part is the context, the rest is the letter.
        base = tok(text, add_special_tokens=False)["input_ids"]
        ids = {letter: tok(text + letter, add_special_tokens=False)["input_ids"] for letter in letters}
        common = len(os.path.commonprefix([base, *ids.values()]))
        tails = {letter: seq[common:] for letter, seq in ids.items()}
        if common == len(base) and all(len(t) == 1 for t in tails.values()):
            logits = self.model(**self._encode(text, frames)).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, -1)
            scores = {letter: float(logprobs[tails[letter][0]]) for letter in letters}
        else:
            # The letter merges with the prefix's last token for this tokenizer: score each full
            # continuation (the sum of its token log-probs) instead of one next token.
            scores = {
                letter: self._continuation_logprob(text + letter, frames, len(ids[letter]) - common)
                for letter in letters
            }
        best = max(letters, key=lambda letter: scores[letter])
        return Choice(best, json.dumps({k: round(v, 4) for k, v in scores.items()}), "letter_logits")

    def _continuation_logprob(self, text: str, frames: Sequence[Image.Image], n_tail: int) -> float:
        inputs = self._encode(text, frames)
        logprobs = torch.log_softmax(self.model(**inputs).logits[0].float(), -1)
        ids = inputs["input_ids"][0]
        n = ids.shape[0]
        return float(sum(logprobs[pos - 1, ids[pos]] for pos in range(n - n_tail, n)))

    def close(self) -> None:
        # Free the GPU for the next model of the evaluation.
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


WORK_DIR_FIELD = "evaluator.work_dir"


def checkpoint_identity(
    store: ObjectStore, prefix: str, *, bucket: str | None = None
) -> tuple[str, list[ObjectInfo]]:
    """(identity, files) of a checkpoint in storage: every file's relative name and size plus the SHA-256
    of its small metadata files (configs, tokenizer) — cheap even for many-GB weights, and any retrain
    (new weights change their size or the trainer's configs/state) gives a new identity."""
    prefix = prefix.rstrip("/") + "/"
    infos = list(store.list(prefix, bucket=bucket))
    if not infos:
        raise NotFound(f"no checkpoint files under {prefix!r}", field="models.checkpoint_prefix")
    digest = hashlib.sha256()
    for info in infos:
        rel = info.key[len(prefix) :]
        digest.update(f"{rel}\0{info.size}\n".encode())
        if rel.endswith((".json", ".txt", ".model")) and info.size < 64 << 20:
            digest.update(store.sha256(info.key, bucket=bucket).encode())
    return f"checkpoint:{prefix}@{digest.hexdigest()[:24]}", infos


def fetch_checkpoint_files(
    store: ObjectStore,
    prefix: str,
    files: list[ObjectInfo],
    dest: Path,
    *,
    bucket: str | None = None,
    size_limit: int | None = None,
) -> None:
    """Every object under ``prefix`` into ``dest``, keeping its relative name (read-only copies: hard
    links into a local store on the same disk, so evaluating a 7B model costs no second 14 GB). A
    download that cannot fit in ``dest`` fails before its first byte, naming ``evaluator.work_dir``."""
    if not store.shares_disk_with(dest):
        need = sum(info.size for info in files)
        what = f"downloading the checkpoint {prefix!r} ({gib(need)})"
        require_free(dest, need, field=WORK_DIR_FIELD, what=what, size_limit=size_limit)
    prefix = prefix.rstrip("/") + "/"
    for info in files:
        path = dest / info.key[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        store.get_readonly_file(info.key, path, bucket=bucket)


def download_checkpoint(
    store: ObjectStore,
    prefix: str,
    files: list[ObjectInfo],
    work_dir: Path,
    identity: str,
    *,
    bucket: str | None = None,
    size_limit: int | None = None,
) -> Path:
    """The checkpoint's files in a local folder named by its identity, kept for the next evaluation;
    downloaded once into a temp folder and renamed, so a crash never leaves a half checkpoint that a
    later run would load."""
    return build_once(
        Path(work_dir) / "checkpoints" / hashlib.sha256(identity.encode()).hexdigest()[:24],
        lambda tmp: fetch_checkpoint_files(store, prefix, files, tmp, bucket=bucket, size_limit=size_limit),
        complete=Path.is_dir,
        tmp_prefix=".download-",
    )


def load_downloaded_checkpoint(
    store: ObjectStore,
    prefix: str,
    files: list[ObjectInfo],
    work_dir: Path,
    identity: str,
    *,
    device: str = "auto",
    keep: bool = False,
    size_limit: int | None = None,
) -> CheckpointModel:
    """Download and load a checkpoint. Unless ``keep``, its files live only while it loads (a private
    folder, deleted once the weights are in memory): an evaluator that scores a trained 7B model per job
    would otherwise keep 14 GB of scratch per job, forever."""
    if keep:
        return load_checkpoint_model(
            download_checkpoint(store, prefix, files, work_dir, identity, size_limit=size_limit),
            identity,
            device=device,
        )
    root = Path(work_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".loading-") as tmp:
        fetch_checkpoint_files(store, prefix, files, Path(tmp), size_limit=size_limit)
        return load_checkpoint_model(tmp, identity, device=device)


def load_checkpoint_model(path: str | Path, identity: str, *, device: str = "auto") -> CheckpointModel:
    from dreamframe.models.video_llm import load_video_llm

    try:
        model, processor = load_video_llm(path, device=device)
    except FailedPrecondition as exc:
        raise FailedPrecondition(exc.message, field="models") from exc
    return CheckpointModel(model, processor, identity)


# --- OpenAI-compatible vision endpoints -----------------------------------------------------------------
def image_data_url(image: Image.Image, *, max_side: int = 768) -> str:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


class EndpointModel:
    def __init__(self, client, model: str, identity: str) -> None:
        self.client = client
        self.model = model
        self.identity = identity

    def answer(
        self, frames: Sequence[Image.Image], prompt: str, *, prefix: str = "", max_new_tokens: int
    ) -> str:
        text = f"{prompt}\n{prefix}" if prefix else prompt
        content = [{"type": "image_url", "image_url": {"url": image_data_url(f)}} for f in frames]
        content.append({"type": "text", "text": text})
        response = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": content}],
            max_tokens=max_new_tokens,
            temperature=0,
        )
        return (response.choices[0].message.content or "").strip()

    def choose(
        self, frames: Sequence[Image.Image], prompt: str, candidates: list[str], *, prefix: str
    ) -> Choice:
        reply = self.answer(frames, prompt, prefix=prefix, max_new_tokens=16)
        return Choice(mvbench_letter(reply, candidates), reply, "generated")

    def close(self) -> None:
        self.client.close()


def make_endpoint_model(endpoint: Endpoint, *, timeout: float, max_retries: int = 2) -> EndpointModel:
    """A model behind a resolved endpoint (``endpoints.resolve_model_endpoint``: the key is the server's)."""
    client = openai_client(endpoint, timeout=timeout, max_retries=max_retries)
    return EndpointModel(client, endpoint.model, endpoint.identity)


# --- answers shipped with the benchmark -------------------------------------------------------------------
class PredictionsModel:
    """Stands for "the predictions already in the benchmark files"; asking it anything is a bug."""

    def __init__(self, name: str) -> None:
        self.identity = f"predictions:{name}"

    def answer(self, frames, prompt, *, prefix="", max_new_tokens):  # noqa: ANN001
        raise FailedPrecondition(
            "this model only has the predictions shipped with the benchmark", field="models"
        )

    def choose(self, frames, prompt, candidates, *, prefix):  # noqa: ANN001
        raise FailedPrecondition(
            "this model only has the predictions shipped with the benchmark", field="models"
        )

    def close(self) -> None:
        pass
