"""The OpenAI chat-completions request and response shapes the server speaks, as plain functions (no HTTP).

A request: one user message whose content holds the question as text parts and one image as an `image_url`
part with a base64 data URL (`data:image/png;base64,...`); system messages are ignored (the prompt is the
model's own IVT-LR format); `max_tokens` (or `max_completion_tokens`), `temperature` (default 0: greedy, the
answer `ivtlr_generate` gives), `top_p`, `seed`, `stream`. IVT-LR extras go in an `ivtlr` object: in the
request `{"choices": ["...", ...]}` (the answer options: the prompt lists them and the answer is a letter), in
the response `{"answer", "selected_patches", "patch_grid", "latents"}`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import time

from ..predict import Answer, Question

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                      re.IGNORECASE)
UNSUPPORTED_PARTS = {"video_url": "video", "video": "video", "input_audio": "audio", "audio_url": "audio",
                     "file": "files"}


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400): the message names the problem, `param` the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    question: Question
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool
    model: str


def parse_chat_request(body, max_new_tokens: int) -> ChatRequest:
    """A chat-completions body -> what to ask; BadRequest naming the problem."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    question = question_of(body.get("messages"), body.get("ivtlr") or {})
    n = body.get("n", 1)
    if n not in (None, 1):
        raise BadRequest(f"n={n!r}: this server returns one choice per request (n=1)", "n")
    for key in ("tools", "functions", "logprobs", "stop"):
        if body.get(key):
            raise BadRequest(f"{key!r} is not supported by this server", key)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = max_new_tokens if max_tokens is None else max_tokens
    if not _is_int(max_tokens) or not 1 <= max_tokens <= max_new_tokens:
        raise BadRequest(f"max_tokens={max_tokens!r}: must be an integer from 1 to {max_new_tokens}", "max_tokens")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise BadRequest("top_p must be > 0", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest(f"seed={seed!r}: must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream={stream!r}: must be true or false", "stream")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return ChatRequest(question, int(max_tokens), temperature, top_p, seed, stream, include_usage,
                       str(body.get("model") or ""))


def question_of(messages, extras) -> Question:
    """The one user message's text and image (and the `ivtlr.choices` extra) -> a Question."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))]
    if len(turns) != 1 or not isinstance(turns[0], dict) or turns[0].get("role") != "user":
        raise BadRequest("give exactly one user message (besides system messages): the model answers one "
                         "question about one image", "messages")
    content = turns[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest("a message's content must be a string or a list of parts", "messages")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(image_of(part.get("image_url")))
        elif kind in UNSUPPORTED_PARTS:
            raise BadRequest(f"{UNSUPPORTED_PARTS[kind]} input ({kind!r}) is not supported: one image per request",
                             "messages")
        else:
            raise BadRequest(f"unsupported content part {kind!r} (text and image_url are taken)", "messages")
    if len(images) != 1:
        raise BadRequest(f"{len(images)} images in the message; give exactly one (an image_url part)", "messages")
    if not isinstance(extras, dict):
        raise BadRequest("ivtlr must be an object", "ivtlr")
    return Question(images[0], "\n".join(texts), extras.get("choices"))


def image_of(image_url) -> bytes:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise BadRequest("image_url needs a url", "messages")
    match = DATA_URL.match(url)
    if not match:
        raise BadRequest("image_url must be a data URL (data:image/...;base64,...); this server fetches nothing",
                         "messages")
    if not match.group("b64"):
        raise BadRequest("the image data URL must be base64-encoded (;base64,)", "messages")
    try:
        return base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("the image data URL is not valid base64", "messages") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequest(f"{key}={value!r}: must be a number from {low} to {high}", key)
    return float(value)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def usage(answer_or_prompt: Answer | int, completion: int = 0) -> dict:
    prompt = answer_or_prompt.prompt_tokens if isinstance(answer_or_prompt, Answer) else answer_or_prompt
    completion = answer_or_prompt.generated_tokens if isinstance(answer_or_prompt, Answer) else completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def ivtlr_extras(answer: Answer) -> dict:
    return {"answer": answer.answer, "selected_patches": answer.selected_patches,
            "patch_grid": list(answer.patch_grid), "latents": len(answer.selected_patches)}


def completion(request_id: str, model: str, answer: Answer) -> dict:
    """The response to a request without `stream`."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason, "logprobs": None}],
            "usage": usage(answer), "ivtlr": ivtlr_extras(answer)}


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    """One server-sent event of a streamed response."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
