"""An OpenAI-compatible embedding server (FastAPI) over :class:`EmbeddingEngine`.

Why: users deploy what they train, and the OpenAI ``/v1/embeddings`` shape is what their
clients already speak. The server must serve the model's real output width (the Dense
projection included: Conan-v1's known field bug is servers that dropped it), truncate to a
Matryoshka size only on request (``e[:d] / ||e[:d]||``), and never answer malformed input
with a 5xx.

How: ``POST /v1/embeddings`` takes ``input`` (a string, a list of strings, a token array or a
list of token arrays of the model's own vocabulary), ``model``, ``dimensions``,
``encoding_format`` (``float`` or ``base64`` little-endian float32, as the OpenAI client asks
by default) and the extensions ``input_type`` (``query`` / ``passage``: selects the model's
prompt and, for a model trained with ``query_max_length`` / ``passage_max_length``, the
token limit of that side) and ``prompt_name`` (one of the model's prompts, e.g. a training
task's instruction; an unknown name is a 400 listing the known ones; a named prompt reads
its texts as queries unless ``input_type`` says otherwise or it is ``passage`` / ``document``). Each request is tokenised in the event loop (that also counts ``usage`` and enforces
the length limit) and handed to :class:`~conan_embedding.serving.batching.MicroBatcher`, which
joins concurrent requests into one forward pass. Limits: body bytes (413), inputs per request
and tokens per input (400); an optional bearer API key (401). Errors have OpenAI's
``{"error": {"message", "type", "param", "code"}}`` shape.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from conan_embedding.encoding.engine import (
    EmbeddingEngine,
    InputTooLongError,
    Tokenized,
    truncate_and_normalize,
)
from conan_embedding.serving.batching import MicroBatcher

try:  # orjson writes numpy arrays directly: JSON encoding is most of a float response's cost
    import orjson
except ImportError:  # pragma: no cover - orjson is in the `serve` extra
    orjson = None


@dataclass
class ServerSettings:
    """Limits and options of one server; the defaults suit a small CPU box."""

    api_key: str | None = None
    max_inputs_per_request: int = 512
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_inputs: int = 256
    max_wait_ms: float = 2.0
    truncate: bool = False  # False: an over-long input is a 400, not a silently cut document
    prompts: dict[str, str] = field(default_factory=dict)  # overrides of the model's prompts
    default_input_type: str | None = None
    aliases: tuple[str, ...] = ()


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- request / response schemas (they are also the OpenAPI spec) ----------------------------

TokenArray = list[StrictInt]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: StrictStr | list[StrictStr] | TokenArray | list[TokenArray] = Field(
        description="A string, a list of strings, a token array, or a list of token arrays "
        "(ids of this model's vocabulary, without special tokens)."
    )
    model: StrictStr = Field(description="The served model's name (see GET /v1/models).")
    dimensions: StrictInt | None = Field(
        default=None, ge=1, description="Matryoshka size: truncate, then re-normalise."
    )
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None
    input_type: Literal["query", "passage", "document"] | None = Field(
        default=None,
        description="Extension: which of the model's prompts to prepend, and which side's "
        "token limit applies (the model's query / passage length).",
    )
    prompt_name: StrictStr | None = Field(
        default=None,
        description="Extension: one of the model's prompts (GET /v1/models lists them), e.g. a "
        "training task's instruction; it overrides input_type's prompt.",
    )


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "conan-embedding"
    dimensions: int
    matryoshka_dimensions: list[int]
    max_input_tokens: int
    prompts: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    backend: str
    dimensions: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Malformed request, too many inputs, an input too long, bad dimensions"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
    )
}


# --- body-size limit --------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: a body over ``limit`` bytes is refused with 413 before any parsing."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        message = f"request body is larger than this server's limit of {self.limit} bytes"
        payload = _json_bytes(_error_body(413, message, None, "request_too_large"))
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _json_bytes(payload: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    import json

    return json.dumps(payload).encode()


# --- the application --------------------------------------------------------------------------


def create_app(engine: EmbeddingEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    batcher = MicroBatcher(
        engine, max_batch_inputs=settings.max_batch_inputs, max_wait_ms=settings.max_wait_ms
    )
    prompts = {**engine.prompts, **settings.prompts}
    names = {engine.name, *settings.aliases}
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="conan-embedding server",
        version="1",
        description="OpenAI-compatible text embeddings with dynamic micro-batching.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.engine, app.state.settings = batcher, engine, settings
    bearer = HTTPBearer(auto_error=False, description="Required when the server has an API key")

    async def check_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
            )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(
            _error_body(err.status, err.message, err.param, err.code), err.status, headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return JSONResponse(_error_body(400, message, where, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            _error_body(err.status_code, str(err.detail), None, None), err.status_code
        )

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=engine.name, backend=engine.backend, dimensions=engine.width)

    @app.get(
        "/v1/models", response_model=ModelList, responses=_ERRORS, dependencies=[Depends(check_key)]
    )
    async def models() -> ModelList:
        card = ModelCard(
            id=engine.name,
            created=created,
            dimensions=engine.width,
            matryoshka_dimensions=engine.matryoshka_dims,
            max_input_tokens=engine.max_tokens,
            prompts=sorted(prompts),
        )
        return ModelList(data=[card])

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=_ERRORS,
        dependencies=[Depends(check_key)],
    )
    async def embeddings(request: EmbeddingRequest) -> Response:
        if request.model not in names:
            raise ApiError(
                404,
                f"model {request.model!r} is not served here; this server serves {engine.name!r}",
                param="model",
                code="model_not_found",
            )
        try:
            engine.check_dimensions(request.dimensions)
        except ValueError as err:
            raise ApiError(400, str(err), param="dimensions", code="invalid_dimensions") from None
        tokens = _tokenize(engine, request, prompts, settings)
        vectors = await batcher.embed(tokens.ids, tokens.prompt_length)
        vectors = truncate_and_normalize(vectors, request.dimensions)
        if request.encoding_format == "base64":
            rows: list[Any] = [
                base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors
            ]
        else:
            rows = list(vectors)
        payload = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)
            ],
            "model": engine.name,
            "usage": {"prompt_tokens": tokens.token_count, "total_tokens": tokens.token_count},
        }
        return Response(_json_bytes(payload), media_type="application/json")

    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    return app


def _tokenize(
    engine: EmbeddingEngine,
    request: EmbeddingRequest,
    prompts: dict[str, str],
    settings: ServerSettings,
) -> Tokenized:
    raw = request.input
    if isinstance(raw, str):
        raw = [raw]
    elif raw and isinstance(raw[0], int):
        raw = [raw]  # one token array
    if not raw:
        raise ApiError(400, "input must not be empty", param="input", code="empty_input")
    if len(raw) > settings.max_inputs_per_request:
        raise ApiError(
            400,
            f"{len(raw)} inputs in one request; this server accepts at most "
            f"{settings.max_inputs_per_request} (split the request)",
            param="input",
            code="too_many_inputs",
        )
    input_type = request.input_type or settings.default_input_type
    if input_type == "document" and "document" not in prompts:
        input_type = "passage"
    prompt = prompts.get(input_type) if input_type else None
    side = None if input_type is None else "query" if input_type == "query" else "passage"
    if request.prompt_name is not None:
        if request.prompt_name not in prompts:
            raise ApiError(
                400,
                f"prompt_name {request.prompt_name!r} is not one of this model's prompts: "
                f"{sorted(prompts) or 'none'}",
                param="prompt_name",
                code="unknown_prompt",
            )
        prompt = prompts[request.prompt_name]
        if side is None:
            side = "passage" if request.prompt_name in ("passage", "document") else "query"
    try:
        if isinstance(raw[0], str):
            empty = next((i for i, text in enumerate(raw) if not text), None)
            if empty is not None:
                raise ApiError(
                    400, f"input[{empty}] is an empty string", param="input", code="empty_input"
                )
            return engine.tokenize(raw, prompt or None, truncate=settings.truncate, side=side)
        empty = next((i for i, row in enumerate(raw) if not row), None)
        if empty is not None:
            raise ApiError(
                400, f"input[{empty}] is an empty token array", param="input", code="empty_input"
            )
        return engine.tokenize_ids(raw, prompt or None, truncate=settings.truncate, side=side)
    except InputTooLongError as err:
        raise ApiError(400, str(err), param="input", code="input_too_long") from None
    except ValueError as err:
        raise ApiError(400, str(err), param="input", code="invalid_input") from None


# --- running ----------------------------------------------------------------------------------


def serve(
    engine: EmbeddingEngine,
    settings: ServerSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def background_server(
    engine: EmbeddingEngine,
    settings: ServerSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Iterator[str]:
    """Run the server on a free loopback port in a thread; yields its base URL (tests, benches)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(engine, settings), host=host, port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="conan-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the embedding server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


__all__ = [
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ServerSettings",
    "background_server",
    "create_app",
    "serve",
]
