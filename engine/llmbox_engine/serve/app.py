"""The HTTP layer (Starlette): authentication, body limits, and events from the worker as JSON or SSE.

Everything a request means is decided in `service.py`; generation happens in `generation.py`. Every error
leaves as an OpenAI-style body, and a client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmbox_engine.serve import schemas
from llmbox_engine.serve.errors import ApiError, error_body
from llmbox_engine.serve.generation import (
    Admitted,
    ChoiceDone,
    Event,
    Job,
    JobDone,
    JobFailed,
    OverloadedError,
    TextDelta,
)
from llmbox_engine.serve.responses import Shape
from llmbox_engine.serve.schemas import ChatRequest, CompletionRequest
from llmbox_engine.serve.service import Service

log = logging.getLogger("llmbox.serve")

MAX_BODY_BYTES = 1 << 20
_DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this, so the client sees the 413
Handler = Callable[[Request], Awaitable[Response]]


class _ClientGoneError(Exception):
    pass


class EventChannel:
    """Carries events from the worker thread into this request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event | _ClientGoneError] = asyncio.Queue()

    def put(self, event: Event | _ClientGoneError) -> None:
        # a closed loop: the server is going down and nobody is listening
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if isinstance(event, _ClientGoneError):
                raise event
            yield event
            if isinstance(event, JobDone | JobFailed):
                return


def create_app(service: Service, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    def guarded(handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                _check_key(request, api_key)
                return await handler(request)
            except ApiError as exc:
                return error_response(exc)
            except ClientDisconnect:
                return Response(status_code=499)

        return wrapped

    async def health(request: Request) -> Response:
        if service.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading"}, status_code=503)

    async def models(request: Request) -> Response:
        return JSONResponse(service.models())

    async def model(request: Request) -> Response:
        return JSONResponse(service.model(request.path_params["model_id"]))

    async def chat(request: Request) -> Response:
        parsed: ChatRequest = schemas.parse(ChatRequest, await read_json(request, max_body_bytes))
        return await _generate(request, parsed, "chat", service.chat_job)

    async def completions(request: Request) -> Response:
        parsed: CompletionRequest = schemas.parse(CompletionRequest, await read_json(request, max_body_bytes))
        return await _generate(request, parsed, "text", service.completion_job)

    async def _generate(request: Request, parsed: Any, kind: Any, build: Callable[..., Job]) -> Response:
        channel = EventChannel()
        # tokenizing a long prompt takes a while: off the event loop
        job = await anyio.to_thread.run_sync(build, parsed, channel.put)
        attached = service.attached
        assert attached is not None
        try:
            attached.worker.submit(job)
        except OverloadedError as exc:
            raise ApiError(
                429, f"server busy: {exc}", type="rate_limit_error", code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None  # fmt: skip
        shape = Shape(kind, parsed.model)
        if parsed.stream:
            return _JobStream(job, _stream(job, channel, shape, parsed.include_usage))
        try:
            return JSONResponse(await _collect(request, job, channel, shape))
        except _ClientGoneError:
            return Response(status_code=499)

    routes = [
        Route("/health", health),
        Route("/v1/models", guarded(models)),
        Route("/v1/models/{model_id:path}", guarded(model)),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},  # type: ignore[dict-item]
    )


class _JobStream(StreamingResponse):
    """Server-sent events that cancel their job however the response ends.

    The stream's own `finally` covers a client leaving mid-stream; this covers one that left before the first
    chunk, when Starlette never starts the stream at all.
    """

    def __init__(self, job: Job, content: AsyncIterator[str]) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        what = "a wrong API key" if header else "no API key"
        raise ApiError(
            401, f"this server needs an API key: `Authorization: Bearer KEY` (got {what})", code="invalid_api_key"
        )


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, code=code), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"), status_code=500)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 beyond `limit` bytes, 400 if it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    body = bytearray()
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            too_big = True
        if too_big:
            if received > _DRAIN_LIMIT:
                break
            continue
        body += chunk
    if too_big:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep for the decoder
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


async def _collect(request: Request, job: Job, channel: EventChannel, shape: Shape) -> dict[str, Any]:
    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()
        channel.put(_ClientGoneError())

    watcher = asyncio.create_task(watch_disconnect())
    texts: dict[int, list[str]] = {}
    finish_reasons: dict[int, str] = {}
    try:
        async for event in channel.events():
            if isinstance(event, Admitted):
                shape.fingerprint = event.fingerprint
            elif isinstance(event, TextDelta):
                texts.setdefault(event.index, []).append(event.text)
            elif isinstance(event, ChoiceDone):
                finish_reasons[event.index] = event.finish_reason
            elif isinstance(event, JobFailed):
                raise ApiError(500, event.message, type="server_error")
            elif isinstance(event, JobDone):
                joined = {index: "".join(parts) for index, parts in texts.items()}
                return shape.complete(joined, finish_reasons, event.prompt_tokens, event.completion_tokens)
        raise ApiError(500, "generation ended without an answer", type="server_error")
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once the job is done


async def _stream(job: Job, channel: EventChannel, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

    When the client disconnects, Starlette cancels this generator, and `finally` cancels the generation.
    """
    started: set[int] = set()

    def data(body: dict[str, Any]) -> str:
        if include_usage and "usage" not in body:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        async for event in channel.events():
            if isinstance(event, Admitted):
                shape.fingerprint = event.fingerprint
                continue
            if isinstance(event, JobFailed):
                yield f"data: {json.dumps(error_body(event.message, type='server_error'))}\n\n"
                break
            if isinstance(event, JobDone):
                if include_usage:
                    yield data(shape.usage_chunk(event.prompt_tokens, event.completion_tokens))
                break
            index = event.index
            if index not in started and shape.kind == "chat":
                yield data(shape.chunk(index, text="", role=True))
            started.add(index)
            if isinstance(event, TextDelta):
                yield data(shape.chunk(index, text=event.text))
            else:
                yield data(shape.chunk(index, finish_reason=event.finish_reason))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
