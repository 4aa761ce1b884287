"""The chat back-ends against a real HTTP server on 127.0.0.1 speaking the OpenAI chat API,
and a tiny random local Hugging Face model; plus the persistent completion cache.

The loopback server (:class:`ChatServer`) is imported by the other builder tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conan_embedding.data.builders.backends import (
    BackendConfig,
    BackendError,
    HFChatBackend,
    OpenAIChatBackend,
    make_backend,
)
from conan_embedding.data.builders.cache import CompletionCache, request_key

# A policy sees (request number from 1, body) and returns None to answer normally, an HTTP
# status to fail with, or "drop" to close the connection without an answer.
Policy = Callable[[int, dict], "int | str | None"]


def echo(body: dict) -> str:
    return "echo: " + body["messages"][-1]["content"]


class ChatServer:
    """A small OpenAI-compatible ``/v1/chat/completions`` server bound to 127.0.0.1."""

    def __init__(self, responder: Callable[[dict], str] = echo, delay: float = 0.0):
        self.responder = responder
        self.policy: Policy | None = None
        self.delay = delay
        self.lock = threading.Lock()
        self.requests = 0
        self.successes = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.headers: list[dict] = []
        self.stall = threading.Event()  # while set, answers wait (bounded) before replying
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                return None

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with server.lock:
                    server.requests += 1
                    number = server.requests
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.headers.append(dict(self.headers))
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    deadline = time.monotonic() + 10
                    while server.stall.is_set() and time.monotonic() < deadline:
                        time.sleep(0.02)
                    verdict = server.policy(number, body) if server.policy else None
                    if verdict == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if self.path.rstrip("/") != "/v1/chat/completions":
                        verdict = 404
                    if isinstance(verdict, int):
                        self._send(
                            verdict,
                            {"error": {"message": f"failure {verdict}"}},
                            {"Retry-After": "0"},
                        )
                        return
                    content = server.responder(body)
                    with server.lock:
                        server.successes += 1
                    self._send(200, {
                        "id": f"chatcmpl-{number}", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                    })  # fmt: skip
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stall.clear()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"text number {i}"}] for i in range(n)]


def make_openai(
    server: ChatServer, cache: CompletionCache | None = None, **kwargs
) -> OpenAIChatBackend:
    options = {
        "concurrency": 2,
        "max_retries": 3,
        "backoff_base": 0.01,
        "timeout": 5.0,
        "show_progress": False,
    }
    options.update(kwargs)
    return OpenAIChatBackend(server.base_url, "test-model", cache=cache, **options)


def test_openai_backend_returns_completions_in_order_with_auth_header():
    with ChatServer() as server:
        backend = make_openai(server, api_key="secret-123", concurrency=3)
        out = backend.complete(conversations(7))
    assert out == [f"echo: text number {i}" for i in range(7)]
    assert server.requests == 7
    assert all(h.get("Authorization") == "Bearer secret-123" for h in server.headers)


def test_openai_backend_keeps_requests_in_flight_up_to_concurrency():
    with ChatServer(delay=0.15) as server:
        make_openai(server, concurrency=4).complete(conversations(8))
    assert 2 <= server.max_in_flight <= 4


@pytest.mark.parametrize("failure", [503, 429, 500, "drop"])
def test_openai_backend_retries_transient_failures(failure):
    seen: set[str] = set()

    def fail_first_attempt(number: int, body: dict):
        key = body["messages"][-1]["content"]
        if key in seen:
            return None
        seen.add(key)
        return failure

    with ChatServer() as server:
        server.policy = fail_first_attempt
        out = make_openai(server).complete(conversations(4))
    assert out == [f"echo: text number {i}" for i in range(4)]
    assert server.requests == 8  # every request failed once, then succeeded


def test_openai_backend_does_not_retry_a_client_error():
    with ChatServer() as server:
        server.policy = lambda number, body: 400
        backend = make_openai(server, concurrency=1)
        with pytest.raises(BackendError, match="HTTP 400"):
            backend.complete(conversations(1))
    assert server.requests == 1


def test_openai_backend_gives_up_after_max_retries():
    with ChatServer() as server:
        server.policy = lambda number, body: 503
        with pytest.raises(BackendError, match="after 3 attempts"):
            make_openai(server, concurrency=1, max_retries=2).complete(conversations(1))
    assert server.requests == 3


def test_openai_backend_rejects_a_malformed_answer():
    with (
        ChatServer(responder=lambda body: None) as server,  # content null
        pytest.raises(BackendError, match="non-text"),
    ):
        make_openai(server, concurrency=1).complete(conversations(1))


def test_server_dying_mid_run_loses_nothing_and_a_rerun_resumes(tmp_path):
    cache_path = tmp_path / "cache.sqlite"
    with ChatServer() as server:
        server.policy = lambda number, body: 500 if server.successes >= 5 else None  # dies after 5
        with pytest.raises(BackendError):
            make_openai(server, CompletionCache(cache_path), max_retries=1).complete(
                conversations(12)
            )
        answered_before = server.successes
    assert answered_before >= 5
    # A new process would open the same file: every answered request is there.
    reopened = CompletionCache(cache_path)
    assert len(reopened) == answered_before

    with ChatServer() as revived:
        out = make_openai(revived, reopened).complete(conversations(12))
    assert out == [f"echo: text number {i}" for i in range(12)]
    assert revived.successes == 12 - answered_before  # only the missing ones were sent
    assert len(CompletionCache(cache_path)) == 12


def test_completion_cache_is_keyed_by_the_whole_request(tmp_path):
    cache = CompletionCache(tmp_path / "c.sqlite")
    request = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.0}
    cache.put(request, "answer")
    assert cache.get(dict(reversed(list(request.items())))) == "answer"  # key order irrelevant
    assert cache.get({**request, "temperature": 0.7}) is None
    assert request_key(request) != request_key({**request, "model": "other"})
    cache.close()
    assert CompletionCache(tmp_path / "c.sqlite").get(request) == "answer"


_CRASH_SCRIPT = """
import sys
from conan_embedding.data.builders.backends import OpenAIChatBackend
from conan_embedding.data.builders.cache import CompletionCache
backend = OpenAIChatBackend(sys.argv[1], "test-model", concurrency=1, max_retries=0,
                            cache=CompletionCache(sys.argv[2]), show_progress=False)
backend.complete([[{"role": "user", "content": f"text number {i}"}] for i in range(10)])
"""


def test_killed_process_keeps_every_answer_it_received(tmp_path):
    cache_path = tmp_path / "cache.sqlite"
    with ChatServer() as server:

        def stall_after_four(number: int, body: dict):
            if number == 4:
                server.stall.set()  # the 5th request will hang until the process is killed
            return None

        server.policy = stall_after_four
        process = subprocess.Popen(
            [sys.executable, "-c", _CRASH_SCRIPT, server.base_url, str(cache_path)],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        deadline = time.monotonic() + 60
        while server.requests < 5 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        server.stall.clear()
        assert server.successes >= 4
    assert len(CompletionCache(cache_path)) == 4

    with ChatServer() as revived:
        out = make_openai(revived, CompletionCache(cache_path)).complete(conversations(10))
    assert out == [f"echo: text number {i}" for i in range(10)]
    assert revived.requests == 6


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with a word-level tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from conftest import WORDS

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {
        tok: i for i, tok in enumerate([*specials, *WORDS, "user", "assistant", "system", ":"])
    }
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_hf_backend_generates_deterministically_and_caches(tmp_path):
    model_dir = build_tiny_llama(tmp_path / "tiny-llama")
    chats = [
        [{"role": "user", "content": "the cat sat on the mat"}],
        [{"role": "user", "content": "dog"}],
    ]
    cache = CompletionCache(tmp_path / "hf.sqlite")
    backend = HFChatBackend(
        str(model_dir), max_new_tokens=6, batch_size=2, cache=cache, show_progress=False
    )
    first = backend.complete(chats)
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert any(t for t in first)  # a random model still emits words of its vocabulary
    assert backend.generated == 2
    assert backend.prompt_text(chats[1]) == "user : dog assistant :"
    again = HFChatBackend(
        str(model_dir), max_new_tokens=6, batch_size=1, cache=None, show_progress=False
    )
    assert again.complete(chats) == first  # greedy: the same text batched or not
    assert backend.complete(chats) == first and backend.generated == 2  # served from the cache


def test_make_backend_validates_the_config(tmp_path):
    with pytest.raises(ValueError, match="base_url"):
        make_backend(BackendConfig(kind="openai", model="m"))
    with ChatServer() as server:
        backend = make_backend(
            BackendConfig(
                kind="openai", model="m", base_url=server.base_url, cache=str(tmp_path / "c.sqlite")
            ),
            show_progress=False,
        )
        assert backend.complete(conversations(1)) == ["echo: text number 0"]
