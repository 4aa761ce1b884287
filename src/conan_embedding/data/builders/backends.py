"""Chat back-ends that turn prompts into text: an OpenAI-compatible HTTP endpoint and a local
Hugging Face causal LM.

Why: Conan-v2 translates queries with an LLM (Qwen2.5-7B) and v1 trains on LLM-generated
retrieval and STS pairs. Users run that LLM behind vLLM, ollama, llama.cpp or a hosted API,
all of which speak the OpenAI ``/v1/chat/completions`` protocol, or load it in-process with
transformers. The builders only need "messages in, text out", so both are one interface.

How:
- :class:`OpenAIChatBackend` posts to ``{base_url}/chat/completions`` with ``httpx`` from a
  thread pool (``concurrency`` requests in flight). Connection errors, timeouts, 408, 409,
  429 and 5xx are retried with exponential backoff and jitter, honouring ``Retry-After``;
  other 4xx fail at once with the server's message. Every completion is written to the
  :class:`~.cache.CompletionCache` as soon as it arrives, so a crash or a dead server loses
  nothing and a rerun only sends what is missing.
- :class:`HFChatBackend` applies the tokenizer's chat template, generates greedily in
  left-padded batches and caches the same way.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from conan_embedding.data.builders.cache import CompletionCache
from conan_embedding.progress import progress as progress_bar

logger = logging.getLogger(__name__)

Message = dict[str, str]
Conversation = list[Message]
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class BackendError(RuntimeError):
    """A request that failed for good (non-retryable status or retries exhausted)."""


@runtime_checkable
class ChatBackend(Protocol):
    """Messages in, assistant text out; one output per conversation, in order."""

    name: str

    def complete(self, conversations: Sequence[Conversation]) -> list[str]: ...


class OpenAIChatBackend:
    """An OpenAI-compatible chat endpoint (vLLM, ollama, llama.cpp server, hosted APIs)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 4,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        timeout: float = 120.0,
        temperature: float = 0.0,
        max_tokens: int = 256,
        extra_body: dict[str, Any] | None = None,
        cache: CompletionCache | None = None,
        show_progress: bool = True,
    ):
        import httpx

        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"openai:{model}"
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self.cache = cache
        self.show_progress = show_progress
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.requests_sent = 0  # HTTP attempts, for logs and tests
        self._count_lock = threading.Lock()

    def request_body(self, conversation: Conversation) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": conversation,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }

    def complete(self, conversations: Sequence[Conversation]) -> list[str]:
        bodies = [self.request_body(c) for c in conversations]
        results: list[str | None] = [None] * len(bodies)
        todo = []
        for i, body in enumerate(bodies):
            cached = self.cache.get(body) if self.cache is not None else None
            if cached is None:
                todo.append(i)
            else:
                results[i] = cached
        if todo:
            logger.info(
                "%d of %d requests cached; sending %d",
                len(bodies) - len(todo),
                len(bodies),
                len(todo),
            )
            self._run_pool(bodies, todo, results)
        missing = sum(r is None for r in results)
        if missing:
            raise BackendError(f"{missing} requests got no completion")
        return [r for r in results if r is not None]

    def _run_pool(
        self, bodies: list[dict[str, Any]], todo: list[int], results: list[str | None]
    ) -> None:
        progress = progress_bar(
            total=len(todo), desc=f"{self.name}", disable=not self.show_progress
        )
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._complete_one, bodies[i]): i for i in todo}
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        results[futures[future]] = future.result()  # re-raises a failure
                        progress.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            finally:
                progress.close()

    def _complete_one(self, body: dict[str, Any]) -> str:
        import httpx

        url = f"{self.base_url}/chat/completions"
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                with self._count_lock:
                    self.requests_sent += 1
                response = self._client.post(url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                last_problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    text = _parse_chat_response(response, url)
                    if self.cache is not None:
                        self.cache.put(body, text)
                    return text
                last_problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRYABLE_STATUS:
                    raise BackendError(f"{url} refused the request ({last_problem})")
                retry_after = _retry_after_seconds(response.headers.get("retry-after"))
            if attempt == self.max_retries:
                break
            delay = min(self.backoff_max, self.backoff_base * 2**attempt)
            delay = delay * (0.5 + random.random() / 2)  # jitter: workers do not retry in lockstep
            if retry_after is not None:
                delay = min(self.backoff_max, max(delay, retry_after))
            logger.warning(
                "%s failed (%s); retry %d in %.2fs", url, last_problem, attempt + 1, delay
            )
            time.sleep(delay)
        raise BackendError(f"{url} failed after {self.max_retries + 1} attempts ({last_problem})")

    def close(self) -> None:
        self._client.close()


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _parse_chat_response(response: Any, url: str) -> str:
    try:
        payload = response.json()
        content = payload["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise BackendError(
            f"{url} answered 200 without choices[0].message.content ({type(err).__name__}: "
            f"{response.text[:200]})"
        ) from None
    if not isinstance(content, str):
        raise BackendError(f"{url} answered a non-text message content: {content!r:.200}")
    return content


class HFChatBackend:
    """A local Hugging Face causal LM (a folder or a hub name for online users), greedy decoding."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        device: str = "cpu",
        cache: CompletionCache | None = None,
        show_progress: bool = True,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = str(model_name_or_path)
        self.name = f"hf:{self.model_name}"
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self.tokenizer.padding_side = "left"  # generation continues from the right end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_name).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.cache = cache
        self.show_progress = show_progress
        self.generated = 0  # conversations actually run through the model

    def prompt_text(self, conversation: Conversation) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        # A base model without a chat template: plain role-prefixed turns.
        turns = [f"{m['role']}: {m['content']}" for m in conversation]
        return "\n".join(turns) + "\nassistant:"

    def cache_request(self, conversation: Conversation) -> dict[str, Any]:
        return {"model": self.name, "messages": conversation, "max_new_tokens": self.max_new_tokens}

    def complete(self, conversations: Sequence[Conversation]) -> list[str]:
        import torch

        results: list[str | None] = [None] * len(conversations)
        todo = []
        for i, conversation in enumerate(conversations):
            cached = self.cache.get(self.cache_request(conversation)) if self.cache else None
            if cached is None:
                todo.append(i)
            else:
                results[i] = cached
        starts = range(0, len(todo), self.batch_size)
        for start in progress_bar(
            starts, desc=self.name, disable=not self.show_progress or not todo
        ):
            batch = todo[start : start + self.batch_size]
            prompts = [self.prompt_text(conversations[i]) for i in batch]
            encoded = self.tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            with torch.no_grad():
                output = self.model.generate(
                    **encoded,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                results[i] = text.strip()
                if self.cache is not None:
                    self.cache.put(self.cache_request(conversations[i]), results[i])
            self.generated += len(batch)
        return [r if r is not None else "" for r in results]


class BackendConfig(BaseModel):
    """How to reach a generator; the same fields as the CLI options."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["openai", "hf"]
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(default=4, ge=1)
    max_retries: int = Field(default=5, ge=0)
    backoff_base: float = Field(default=1.0, ge=0)
    timeout: float = Field(default=120.0, gt=0)
    temperature: float = 0.0
    max_tokens: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    cache: str | None = None


def make_backend(config: BackendConfig, show_progress: bool = True) -> ChatBackend:
    """Build the back-end a config names, with its persistent cache if one is given."""
    cache = CompletionCache(config.cache) if config.cache else None
    if config.kind == "openai":
        if not config.base_url:
            raise ValueError("the openai back-end needs base_url (e.g. http://localhost:8000/v1)")
        return OpenAIChatBackend(
            config.base_url,
            config.model,
            os.environ.get(config.api_key_env),
            concurrency=config.concurrency,
            max_retries=config.max_retries,
            backoff_base=config.backoff_base,
            timeout=config.timeout,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            cache=cache,
            show_progress=show_progress,
        )
    return HFChatBackend(
        config.model,
        max_new_tokens=config.max_tokens,
        batch_size=config.batch_size,
        cache=cache,
        show_progress=show_progress,
    )
