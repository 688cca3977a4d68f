"""Two chat backends behind one interface, both returning the answer's text for a conversation and the
JSON Schema it must match.

- ``OpenAIChatBackend``: any OpenAI-compatible endpoint (OpenAI, vLLM, ...) through the ``openai``
  package, asking for ``response_format: json_schema`` (strict). A server that rejects that is asked
  for ``json_object`` from then on, and the schema in the prompt plus validation do the rest. Rate limits,
  timeouts and server errors are retried with exponential backoff by the client (``max_retries``).
- ``LocalChatBackend``: a transformers causal LM with xgrammar grammar-constrained decoding, so any model
  (even a random one) can only write JSON the schema accepts. One generation at a time per model (the
  weights are shared), on one worker thread of its own so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dreamframe.errors import FailedPrecondition, InvalidArgument, Unavailable


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 8192
    seed: int = 0


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict[str, str], ...]
    schema: dict[str, Any]
    # A short name for the schema (OpenAI's json_schema.name): letters, digits, '_' and '-'.
    schema_name: str
    sampling: Sampling


class ChatBackend(ABC):
    """Answers a conversation with text that should match ``request.schema``."""

    kind: str
    model: str

    @abstractmethod
    async def complete(self, request: ChatRequest) -> str: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections / memory; the default has nothing to release."""


# --- OpenAI-compatible endpoints -------------------------------------------------------------------------


HTTP_CLIENTS = 8


def _rejects_json_schema(exc: Exception) -> bool:
    text = str(exc).lower()
    return "json_schema" in text or "response_format" in text


class OpenAIChatBackend(ChatBackend):
    kind = "openai"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None,
        api_key: str = "",
        timeout: float = 120.0,
        max_retries: int = 5,
    ) -> None:
        from openai import AsyncOpenAI

        self.model = model
        # Several clients, used in turn: httpx's pool scans all of its connections on every request event,
        # so 100+ calls in flight on one pool cost CPU quadratic in their number. Local servers (vLLM)
        # accept any key; the client refuses an empty one.
        self._clients = [
            AsyncOpenAI(
                base_url=base_url, api_key=api_key or "unused", timeout=timeout, max_retries=max_retries
            )
            for _ in range(HTTP_CLIENTS)
        ]
        self._turn = itertools.count()
        # None: not tried yet; False: the server said no, use json_object.
        self.json_schema_supported: bool | None = None

    async def complete(self, request: ChatRequest) -> str:
        import openai

        if self.json_schema_supported is not False:
            fmt = {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.schema, "strict": True},
            }
            try:
                text = await self._create(request, fmt)
                self.json_schema_supported = True
                return text
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if not _rejects_json_schema(exc):
                    raise FailedPrecondition(f"the LLM endpoint refused the request: {exc}") from exc
                self.json_schema_supported = False
        try:
            return await self._create(request, {"type": "json_object"})
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            raise FailedPrecondition(f"the LLM endpoint refused the request: {exc}") from exc

    async def _create(self, request: ChatRequest, response_format: dict[str, Any]) -> str:
        import openai
        from openai.types.chat import ChatCompletion

        s = request.sampling
        body = {
            "model": self.model,
            "messages": list(request.messages),
            "response_format": response_format,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_completion_tokens": s.max_tokens,
            "seed": s.seed,
        }
        client = self._clients[next(self._turn) % len(self._clients)]
        try:
            # client.post, not chat.completions.create: create() runs every request's params (our whole
            # schema included) through its typing transform, most of a call's client CPU when 100+ are in
            # flight. Same endpoint, retries, backoff and errors.
            response = await client.post("/chat/completions", cast_to=ChatCompletion, body=body)
        except openai.NotFoundError as exc:
            raise InvalidArgument(
                f"the LLM endpoint does not know model {self.model!r}", field="options.model"
            ) from exc
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise FailedPrecondition(f"the LLM endpoint refused the API key: {exc}") from exc
        except (openai.RateLimitError, openai.APIConnectionError, openai.InternalServerError) as exc:
            # Already retried with backoff by the client; the endpoint is down or saturated.
            raise Unavailable(f"the LLM endpoint is unavailable after retries: {exc}") from exc
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                raise Unavailable(f"the LLM endpoint failed after retries: {exc}") from exc
            raise
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()


# --- local transformers models ---------------------------------------------------------------------------


class LocalChatBackend(ChatBackend):
    kind = "local"

    def __init__(self, llm: Any) -> None:
        """``llm``: a ``dreamframe.models.text_llm.TextLLM``."""
        import xgrammar as xgr

        self.model = llm.name
        self._llm = llm
        tok = llm.tokenizer
        eos = llm.model.generation_config.eos_token_id
        stop = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
        info = xgr.TokenizerInfo.from_huggingface(
            tok, vocab_size=llm.model.config.vocab_size, stop_token_ids=stop
        )
        self._compiler = xgr.GrammarCompiler(info)
        self._grammars: dict[str, Any] = {}
        # One generation at a time (the weights and the GPU are shared by every call), always on the same
        # thread: CUDA and Triton (xgrammar's mask kernel) set up per thread, seconds each time on a GPU.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-generate")

    def _grammar(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            # No free whitespace: a random model would otherwise write blanks until max_new_tokens.
            grammar = self._compiler.compile_json_schema(key, any_whitespace=False)
            if len(self._grammars) > 512:
                self._grammars.clear()
            self._grammars[key] = grammar
        return grammar

    async def complete(self, request: ChatRequest) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._generate, request)

    def warm_up(self) -> None:
        """One short constrained generation, so the first real call does not pay for kernel compilation
        (on a GPU, Triton compiles xgrammar's mask kernel on first use)."""
        request = ChatRequest(
            ({"role": "user", "content": "ready?"},), _WARM_UP_SCHEMA, "warm_up", Sampling(0.0)
        )
        self._worker.submit(self._generate, request).result()

    def _generate(self, request: ChatRequest) -> str:
        import torch
        import xgrammar as xgr

        llm, s = self._llm, request.sampling
        grammar = self._grammar(request.schema)
        inputs = llm.tokenizer.apply_chat_template(
            list(request.messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(llm.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if s.temperature > 0:
            sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
        cuda = llm.device.type == "cuda"
        devices = [llm.device.index or 0] if cuda else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode(), _attention_kernels(cuda):
            torch.manual_seed(s.seed % 2**63)
            out = llm.model.generate(
                **inputs,
                logits_processor=[xgr.contrib.hf.LogitsProcessor(grammar)],
                max_new_tokens=s.max_tokens,
                pad_token_id=llm.tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return llm.tokenizer.decode(new_tokens, skip_special_tokens=True)

    async def aclose(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _attention_kernels(cuda: bool) -> Any:
    """Flash / memory-efficient attention, not cuDNN's: cuDNN builds an execution plan for every new
    sequence length, and each decoding step is one — about 36 ms a token instead of 3 ms for the tiny
    model on an H100/H200 (torch 2.11), until every length has been seen once."""
    if not cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


_WARM_UP_SCHEMA = {
    "type": "object",
    "properties": {"ready": {"type": "boolean"}},
    "required": ["ready"],
    "additionalProperties": False,
}
