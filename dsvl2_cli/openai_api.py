"""The OpenAI chat-completions dialect that `dsvl2 serve` speaks, as pure functions: a decoded JSON body →
the conversation and sampling our engine runs (or an `APIError` carrying the HTTP status and OpenAI's error
shape), and a finished answer → the response body or its stream chunks. No transport here (server.py owns
HTTP); nothing here loads a model.

The conversation is built exactly as the CLI builds a page's (`dsvl2.model.requests.user_prompt`): each image
part becomes `<image>\\n` where it stands, text parts follow as written, so `[image, text]` is byte for byte
the local prompt. Extensions to OpenAI's request: `repetition_penalty`, `no_repeat_ngram`, `repeat_window`
(our repetition guard); to its response: finish reason `repetition` when that guard stopped the answer.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from dsvl2.model.requests import ASSISTANT, IMAGE_TOKEN, USER, Completion, Message, Sampling
from dsvl2.pages import to_rgb

IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
# OpenAI's finish reasons; "repetition" is ours (the guard), "cancelled" never reaches a client.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "repetition": "repetition", "cancelled": "stop"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[\w.+-]+=[\w.+-]+)*;base64,(?P<data>.*)$", re.DOTALL)
# Request fields we cannot honour: refused when set to anything but their neutral value, never ignored.
_UNSUPPORTED = {"n": 1, "logprobs": False, "top_logprobs": None, "tools": None, "functions": None,
                "response_format": None, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may carry. `max_image_bytes` counts decoded bytes, `max_image_pixels` width x height."""

    max_images: int = 8
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 50_000_000
    allow_remote_images: bool = False


class APIError(Exception):
    """A request the server refuses: `status` is the HTTP status, `body()` OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A chat request, checked: what to run and how to answer. `max_tokens` None: up to the context."""

    conversation: tuple[Message, ...]
    sampling: Sampling
    max_tokens: int | None
    stream: bool
    include_usage: bool


def parse_chat(body: Any, *, model: str, limits: Limits, fetch: Callable[[str], bytes] | None = None) -> ChatCall:
    """Check a decoded request body against the served `model` and `limits`; `fetch` downloads a remote image
    (only called when `limits.allow_remote_images`). Raises APIError naming the offending field."""
    if not isinstance(body, Mapping):
        raise APIError(400, "the request body must be a JSON object")
    name = body.get("model") or model  # OpenAI requires it; one model is served, so absent means that one
    if name != model:
        raise APIError(404, f"model {name!r} is not served here; this server serves {model!r}",
                       param="model", code="model_not_found")
    for key, neutral in _UNSUPPORTED.items():
        if key in body and body[key] is not None and body[key] != neutral:
            raise APIError(400, f"{key}={body[key]!r} is not supported by this server", param=key,
                           code="unsupported_parameter")
    conversation = _conversation(body.get("messages"), limits, fetch)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _integer(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", 1)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop
    if stops is not None and not (isinstance(stops, list | tuple) and len(stops) <= 4
                                  and all(isinstance(s, str) and s for s in stops)):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    try:
        sampling = Sampling(
            max_new_tokens=max_tokens or 1,  # the server sets the real budget once it knows the prompt's length
            temperature=_number(body, "temperature", 1.0, lo=0.0, hi=2.0),
            top_p=_number(body, "top_p", 1.0, lo=0.0, hi=1.0, open_lo=True),
            seed=_integer(body, "seed", None) if body.get("seed") is not None else 0,
            stop=tuple(stops or ()),
            no_repeat_ngram=_integer(body, "no_repeat_ngram", 0) if "no_repeat_ngram" in body else 0,
            repeat_window=_integer(body, "repeat_window", 0) if "repeat_window" in body else 256,
            repetition_penalty=_number(body, "repetition_penalty", 1.0, lo=0.0, hi=None, open_lo=True),
        )
    except ValueError as exc:  # the values the runtime rejects (top_p 0, a penalty of 0)
        raise APIError(400, str(exc)) from None
    return ChatCall(conversation, sampling, max_tokens, _flag(body, "stream"), _flag(options, "include_usage"))


def _conversation(messages: Any, limits: Limits, fetch: Callable[[str], bytes] | None) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    turns: list[Message] = []
    n_images = 0
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(message, Mapping):
            raise APIError(400, f"{where} must be an object", param=where)
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role {role!r} is not supported: DeepSeek-VL2's chat template has user "
                           "and assistant turns only", param=f"{where}.role")
        if (role == "user") == (bool(turns) and turns[-1].role == USER):
            raise APIError(400, f"{where}: turns must alternate user, assistant, user, ... and start with user",
                           param=f"{where}.role")
        text, images = _content(content, where, limits, fetch)
        n_images += len(images)
        if n_images > limits.max_images:
            raise APIError(400, f"too many images: at most {limits.max_images} per request", param=where,
                           code="too_many_images")
        if role == "assistant" and images:
            raise APIError(400, f"{where}: assistant turns cannot hold images", param=f"{where}.content")
        turns.append(Message(USER if role == "user" else ASSISTANT, text, images))
    if turns[-1].role != USER:
        raise APIError(400, "the last message must be the user's", param=f"messages[{len(messages) - 1}].role")
    return (*turns, Message(ASSISTANT, ""))


def _content(content: Any, where: str, limits: Limits,
             fetch: Callable[[str], bytes] | None) -> tuple[str, tuple[Image.Image, ...]]:
    """A message's text, with `<image>\\n` where each image part stood, and its images."""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    pieces: list[str] = []
    images: list[Image.Image] = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise APIError(400, f"{at}: text cannot contain {IMAGE_TOKEN}; send images as image_url parts",
                               param=at)
            pieces.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str):
                raise APIError(400, f"{at}.image_url.url must be a string", param=at)
            images.append(_image(url, at, limits, fetch))
            pieces.append(f"{IMAGE_TOKEN}\n")
        else:
            raise APIError(400, f"{at} must be a text part or an image_url part", param=at)
    return "".join(pieces), tuple(images)


def _image(url: str, at: str, limits: Limits, fetch: Callable[[str], bytes] | None) -> Image.Image:
    match = _DATA_URL.match(url)
    if match:
        mime, data = match["mime"].lower(), match["data"]
        if mime not in IMAGE_FORMATS:
            raise APIError(400, f"{at}: image type {mime} is not supported (PNG, JPEG or WebP)", param=at,
                           code="invalid_image")
        if len(data) * 3 // 4 > limits.max_image_bytes:
            raise APIError(413, f"{at}: image is over {limits.max_image_bytes:,} bytes", param=at,
                           code="image_too_large")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{at}: the data URL is not valid base64", param=at, code="invalid_image") from None
        formats: tuple[str, ...] = (IMAGE_FORMATS[mime],)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images or fetch is None:
            raise APIError(400, f"{at}: remote image URLs are refused (the server runs without "
                           "--allow-remote-images); send a data: URL", param=at, code="invalid_image")
        try:
            raw = fetch(url)
        except Exception as exc:  # any download failure is the client's problem, reported as such
            raise APIError(400, f"{at}: cannot fetch {url}: {exc}", param=at, code="invalid_image") from None
        if len(raw) > limits.max_image_bytes:
            raise APIError(413, f"{at}: image is over {limits.max_image_bytes:,} bytes", param=at,
                           code="image_too_large")
        formats = tuple(dict.fromkeys(IMAGE_FORMATS.values()))
    else:
        raise APIError(400, f"{at}: an image must be a data: URL (PNG, JPEG or WebP)", param=at, code="invalid_image")
    return _decode(raw, formats, at, limits)


def _decode(raw: bytes, formats: tuple[str, ...], at: str, limits: Limits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit decides
            image = Image.open(io.BytesIO(raw), formats=formats)
            w, h = image.size
            if w * h > limits.max_image_pixels:
                raise APIError(413, f"{at}: image is {w}x{h} pixels, over {limits.max_image_pixels:,}", param=at,
                               code="image_too_large")
            return to_rgb(image)
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(413, f"{at}: image is over Pillow's pixel limit", param=at, code="image_too_large") from None
    except Exception as exc:  # Pillow raises many kinds on corrupt data
        raise APIError(400, f"{at}: cannot decode the image ({type(exc).__name__}: {exc})", param=at,
                       code="invalid_image") from None


def _number(body: Mapping[str, Any], key: str, default: float, *, lo: float, hi: float | None,
            open_lo: bool = False) -> float:
    """A number in [lo, hi] ((lo, hi] with `open_lo`; no upper bound when `hi` is None)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a number", param=key)
    if value < lo or (open_lo and value == lo) or (hi is not None and value > hi):
        low = "(" if open_lo else "["
        raise APIError(400, f"{key} must be in {low}{lo}, {hi}]" if hi is not None else f"{key} must be > {lo}",
                       param=key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str, lo: int | None) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
        raise APIError(400, f"{key} must be an integer" + (f" >= {lo}" if lo is not None else ""), param=key)
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false", param=key)
    return value


# ---------------------------------------------------------------------------------------------------
# Responses


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": completion.n_prompt, "completion_tokens": completion.n_generated,
            "total_tokens": completion.n_prompt + completion.n_generated}


def completion_body(completion: Completion, *, call_id: str, model: str, created: int | None = None) -> dict[str, Any]:
    """The `chat.completion` object for a finished answer."""
    return {
        "id": call_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": FINISH_REASONS[completion.finish_reason], "logprobs": None}],
        "usage": usage(completion),
    }


def chunk_body(*, call_id: str, model: str, created: int, delta: dict[str, str] | None = None,
               finish_reason: str | None = None, usage_of: Completion | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`: a content delta, the closing chunk with its finish reason, or (with
    `usage_of`) the usage chunk that `stream_options.include_usage` asks for (no choices)."""
    chunk: dict[str, Any] = {"id": call_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage_of is not None:
        return {**chunk, "choices": [], "usage": usage(usage_of)}
    reason = FINISH_REASONS[finish_reason] if finish_reason else None
    return {**chunk, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": reason, "logprobs": None}]}
