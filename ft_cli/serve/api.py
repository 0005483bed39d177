"""The OpenAI-compatible HTTP API of `ft serve`, on Starlette (served by uvicorn).

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (streaming with server-sent events),
POST /v1/completions, GET /health. The request's `model` names the adapter (`base`: no adapter).

Every error is JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request,
401 for a missing or wrong API key (checked on every route when the server has one), 404 for an unknown model or
route, 405 for a wrong method. An unexpected failure is a 500 in the same shape, with the traceback in the
server's log only.

Requests go to the engine's queue (ft_cli.serve.engine); the event loop only parses, waits and streams.
Defaults follow `ft generate`: temperature 0.7, top_p 0.9, at most 256 new tokens (fewer when the model's context
has less room). Fields that would change the output but are not implemented (n > 1, logprobs, tools, penalties,
logit_bias, echo, best_of, suffix, JSON response formats) are refused with 400 rather than ignored.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ft_cli.errors import UserError
from ft_cli.serve.engine import Engine, Params, Reply

log = logging.getLogger("ft.serve")

DEFAULT_TEMPERATURE = 0.7  # as ft generate
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Requests ----------------------------------------------------------------------------------------------------------

class _Request(BaseModel):
    # Unknown fields are accepted (clients send e.g. `user`, `metadata`, `store`), those that would change the
    # output are refused in _refuse_unsupported.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


# Fields that change what comes back, refused unless left at their no-op value.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "tools": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "functions": lambda v: bool(v),
    "function_call": lambda v: v not in (None, "none", "auto"),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "logit_bias": lambda v: bool(v),
    "echo": lambda v: bool(v),
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: bool(v),
}


def _parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        lines = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
        raise ApiError(400, "; ".join(lines), param=param or None) from None
    for name, refused in _UNSUPPORTED.items():
        if name in body and refused(body[name]):
            raise ApiError(400, f"{name} is not supported by ft serve's transformers engine", param=name)
    if req.n != 1:
        raise ApiError(400, "n must be 1 (one reply per request)", param="n")
    return req


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: at most 4 non-empty strings", param="stop")
    return tuple(stops)


def _params(req: _Request, max_tokens: int | None, prompt_tokens: int, context: int | None) -> Params:
    room = None if context is None else context - prompt_tokens
    if room is not None and room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens",
                       param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS if room is None else min(DEFAULT_MAX_TOKENS, room)
    elif room is not None and max_tokens > room:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds this "
                       f"model's context of {context} tokens", param="max_tokens", code="context_length_exceeded")
    return Params(max_new_tokens=max_tokens,
                  temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
                  top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p, seed=req.seed, stop=_stops(req.stop))


# Responses ---------------------------------------------------------------------------------------------------------

def _usage(reply: Reply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Api:
    """The routes, bound to one engine."""

    def __init__(self, engine: Engine, *, created: int | None = None, roots: dict[str, str] | None = None):
        self.engine = engine
        self.created = created or int(time.time())
        self.roots = roots or {}

    # /v1/models --------------------------------------------------------------------------------------------------
    def _card(self, name: str) -> dict[str, Any]:
        from ft_cli.adapters import BASE_NAME

        return {"id": name, "object": "model", "created": self.created, "owned_by": "ft",
                "root": self.roots.get(name), "parent": None if name == BASE_NAME else BASE_NAME}

    async def models(self, request: Any) -> Any:
        return {"object": "list", "data": [self._card(n) for n in self.engine.names]}

    async def model(self, request: Any) -> Any:
        return self._card(self._name(request.path_params["model_id"]))

    def _name(self, name: str) -> str:
        if name not in self.engine.tokenizers:
            raise ApiError(404, f"The model `{name}` does not exist; this server has: {', '.join(self.engine.names)}",
                           param="model", code="model_not_found")
        return name

    # /v1/chat/completions ----------------------------------------------------------------------------------------
    async def chat(self, request: Any) -> Any:
        req: ChatRequest = _parse(ChatRequest, await _json(request))
        name = self._name(req.model)
        ids = _user_error(lambda: self.engine.render_chat(name, [m.as_dict() for m in req.messages]), "messages")
        params = _params(req, req.max_completion_tokens or req.max_tokens, len(ids), self.engine.context)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "created": created, "model": name}
        if req.stream:
            def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            return self._stream(name, ids, params, req, first=chunk({"role": "assistant", "content": ""}, None),
                                piece=lambda text: chunk({"content": text}, None),
                                last=lambda reply: chunk({}, reply.finish_reason),
                                usage_chunk={**head, "object": "chat.completion.chunk", "choices": []})
        reply = await self.engine.run(name, ids, params)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "logprobs": None, "finish_reason": reply.finish_reason}],
                "usage": _usage(reply)}

    # /v1/completions ---------------------------------------------------------------------------------------------
    async def completions(self, request: Any) -> Any:
        req: CompletionRequest = _parse(CompletionRequest, await _json(request))
        name = self._name(req.model)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request", param="prompt")
            prompt = prompt[0]
        ids = self.engine.render_text(name, prompt)
        params = _params(req, req.max_tokens, len(ids), self.engine.context)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": name,
                "object": "text_completion"}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if req.stream:
            return self._stream(name, ids, params, req, first=None,
                                piece=lambda text: {**head, "choices": [choice(text, None)]},
                                last=lambda reply: {**head, "choices": [choice("", reply.finish_reason)]},
                                usage_chunk={**head, "choices": []})
        reply = await self.engine.run(name, ids, params)
        return {**head, "choices": [choice(reply.text, reply.finish_reason)], "usage": _usage(reply)}

    async def health(self, request: Any) -> Any:
        return {"status": "ok"}

    # Streaming ---------------------------------------------------------------------------------------------------
    def _stream(self, name: str, ids: list[int], params: Params, req: _Request, *, first: dict[str, Any] | None,
                piece: Callable[[str], dict[str, Any]], last: Callable[[Reply], dict[str, Any]],
                usage_chunk: dict[str, Any]) -> Any:
        """Server-sent events: the text as it is produced, then the finish reason, usage when asked
        (stream_options.include_usage), and `data: [DONE]`. The client going away stops decoding."""
        import asyncio

        from starlette.responses import StreamingResponse

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        engine = self.engine

        async def events() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            cancelled = threading.Event()

            def tell(kind: str, value: Any) -> None:  # from the worker thread
                with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is shutting down
                    loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

            def on_delta(text: str) -> None:
                tell("delta", text)

            def done(future: Any) -> None:
                if not future.cancelled():
                    error = future.exception()  # reported in the stream; the worker logged the traceback
                    tell("done", future.result()) if error is None else tell("error", error)

            engine.submit(name, ids, params, on_delta=on_delta, cancelled=cancelled).add_done_callback(done)
            try:
                if first is not None:
                    yield _sse(first)
                while True:
                    kind, value = await queue.get()
                    if kind == "delta":
                        yield _sse(piece(value))
                    elif kind == "done":
                        yield _sse(last(value))
                        if include_usage:
                            yield _sse({**usage_chunk, "usage": _usage(value)})
                        break
                    else:
                        yield _sse(ApiError(500, f"internal error: {type(value).__name__}",
                                            type_="server_error").body())
                        break
                yield _sse("[DONE]")
            finally:
                cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _json(request: Any) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


def _user_error(fn: Callable[[], Any], param: str) -> Any:
    try:
        return fn()
    except UserError as exc:
        raise ApiError(400, exc.message, param=param) from None


def _error_response(err: ApiError) -> Any:
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _endpoint(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """A route: dicts become JSON, ApiError its status, anything else a 500 without the traceback."""
    from starlette.responses import JSONResponse, Response

    async def handle(request: Any) -> Any:
        try:
            result = await fn(request)
        except ApiError as err:
            return _error_response(err)
        except Exception as exc:
            log.exception("request failed: %s %s", request.method, request.url.path)
            return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error"))
        return result if isinstance(result, Response) else JSONResponse(result)

    return handle


class ApiKey:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer KEY` (what the OpenAI client sends)."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            sent = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = sent.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = ("Missing API key: send the header Authorization: Bearer KEY" if not sent
                           else "Incorrect API key provided")
                await _error_response(ApiError(401, message, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: Engine, *, api_key: str | None = None, roots: dict[str, str] | None = None) -> Any:
    """The ASGI application: routes, OpenAI-shaped 404/405, and the API key check when `api_key` is set."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    api = Api(engine, roots=roots)
    routes = [
        Route("/v1/models", _endpoint(api.models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _endpoint(api.model), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(api.chat), methods=["POST"]),
        Route("/v1/completions", _endpoint(api.completions), methods=["POST"]),
        Route("/health", _endpoint(api.health), methods=["GET"]),
    ]

    async def http_error(request: Any, exc: Exception) -> Any:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.method} {request.url.path}", 405:
                   f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404
                                        else None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        engine.close()

    middleware = [Middleware(ApiKey, key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error},
                     lifespan=lifespan)
