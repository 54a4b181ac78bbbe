"""The HTTP side of `ivtlr-serve` (Starlette on uvicorn): OpenAI-compatible `POST /v1/chat/completions` (JSON or
server-sent events), `GET /v1/models`, `GET /health`, and the page at `/`.

Every request is checked before it reaches the engine: a body that is not JSON, unsupported parameters, an
image that cannot be read or is too large, an empty question, a prompt over the model's cap each get a 4xx JSON
error naming the problem (OpenAI's error shape); a full queue or a server shutting down answers 503 with
Retry-After. A client that disconnects (a closed stream or an abandoned request) frees its slot. SIGTERM (or
Ctrl-C) stops admitting, lets the requests in flight end (up to `graceful_s` seconds, then cancels them) and
exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..predict import RequestError
from . import openai_api as api
from .engine import Busy, ServingEngine, Ticket
from .text_stream import TextStream

MAX_BODY = 32 << 20  # bytes of a request body (a base64 image of ~24 MB)
POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


def make_app(engine: ServingEngine, model_name: str) -> Starlette:
    """The application over a started (or to be started: lifespan) engine."""

    async def health(request: Request):
        return JSONResponse({"status": "ok" if engine.admitting else "draining", "model": model_name, **engine.load})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "ivtlr-jax"}]})

    async def page(request: Request):
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text())

    async def chat(request: Request):
        try:
            body = await read_json(request)
            chat_request = api.parse_chat_request(body, engine.max_new_tokens)
            # image decoding and the processor in a worker thread: the event loop keeps serving meanwhile
            encoded = await asyncio.to_thread(engine.predictor.encode, chat_request.question)
        except api.BadRequest as err:
            return error(400, str(err), param=err.param)
        except RequestError as err:
            return error(400, str(err), param="messages")
        except PayloadTooLarge as err:
            return error(413, str(err))
        seed = chat_request.seed if chat_request.seed is not None else engine.next_seed()
        ticket = Ticket(encoded, chat_request.max_tokens, chat_request.temperature, chat_request.top_p, seed,
                        asyncio.Queue(), asyncio.get_running_loop(), stream=chat_request.stream)
        try:
            engine.submit(ticket)
        except Busy as err:
            return error(503, str(err), kind="server_busy", headers={"Retry-After": "1"})
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        model = chat_request.model or model_name
        if chat_request.stream:
            return StreamingResponse(stream_events(engine, ticket, request_id, model, chat_request.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await whole_answer(request, engine, ticket, request_id, model)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.thread.is_alive():
            engine.start()
        yield
        engine.close()

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


class PayloadTooLarge(ValueError):
    pass


async def read_json(request: Request):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise PayloadTooLarge(f"the request body is {int(length):,} bytes; at most {MAX_BODY:,}")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise PayloadTooLarge(f"the request body is {len(raw):,} bytes; at most {MAX_BODY:,}")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise api.BadRequest(f"the body is not valid JSON ({err})") from None


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse(api.error_body(message, kind, param), status_code=status, headers=headers)


async def whole_answer(request: Request, engine: ServingEngine, ticket: Ticket, request_id: str, model: str):
    """Wait for the answer (checking that the client is still there) -> the chat.completion JSON."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(ticket.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(ticket)
                    return error(499, "client disconnected")
                continue
            if kind == "done":
                return JSONResponse(api.completion(request_id, model, value))
            if kind == "error":
                return error(500, value, kind="server_error")
    except asyncio.CancelledError:
        engine.cancel(ticket)
        raise


async def stream_events(engine: ServingEngine, ticket: Ticket, request_id: str, model: str, include_usage: bool):
    """Server-sent events: the role and the IVT-LR extras once the request has started (its selected patches
    are known before its first token), content deltas as tokens come, the finish reason, [DONE]."""
    text_stream, sent = TextStream(engine.predictor.tokenizer), ""
    event = lambda payload: f"data: {json.dumps(payload)}\n\n"
    try:
        while True:
            kind, value = await ticket.events.get()
            if kind == "started":
                yield event(api.chunk(request_id, model, {"role": "assistant", "content": ""}, ivtlr=value))
            elif kind == "tokens":  # the tokens generated since the last event
                delta = text_stream.add(value)
                if delta:
                    yield event(api.chunk(request_id, model, {"content": delta}))
                    sent += delta
            elif kind == "done":
                rest = value.text[len(sent):] if value.text.startswith(sent) else ""
                if rest:
                    yield event(api.chunk(request_id, model, {"content": rest}))
                extras = {"ivtlr": api.ivtlr_extras(value), **({"usage": api.usage(value)} if include_usage else {})}
                yield event(api.chunk(request_id, model, {}, value.finish_reason, **extras))
                yield "data: [DONE]\n\n"
                return
            else:  # an error after the response began: one error event, then the end
                yield event(api.error_body(value, "server_error"))
                yield "data: [DONE]\n\n"
                return
    finally:  # the end, or the client went away (the generator is closed or cancelled)
        engine.cancel(ticket)
