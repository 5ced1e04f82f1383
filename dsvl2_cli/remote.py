"""`--server URL[,URL...]`: the runtime seam (`dsvl2.pipelines.base.Runtime`) answered by OpenAI-compatible
servers — `dsvl2 serve`, vLLM, SGLang — instead of a model in this process. Everything above the seam (page
rendering, prompts, parsing, records, resume, outputs, exit codes) is the local path's.

Each request becomes one chat completion: the conversation as the local processor would read it (each
`<image>\\n` placeholder an `image_url` part holding the page as a lossless PNG data URL, the text parts as
written), the sampling settings, and our extensions (`repetition_penalty`, the repetition guard) in the body.
Requests go round-robin over the URLs, at most `max_concurrent` at a time; the `openai` client retries 408,
409, 429, 5xx and connection errors with exponential backoff (honouring Retry-After). A request that still
fails comes back as a completion with finish reason "error" and the reason, which the pipeline records as that
page's failure; the run goes on.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from dsvl2.backend import Identity
from dsvl2.model.requests import ASSISTANT, IMAGE_TOKEN, Completion, Message, Request, Timings

# A server's finish reason back to the engine's (OpenAI's "stop" is ours "eos" unless stop strings were set).
_FINISH_BACK = {"length": "length", "repetition": "repetition", "content_filter": "eos", "tool_calls": "eos"}


class ServerError(RuntimeError):
    """A server that cannot be used for the run (unreachable, no such model, not OpenAI-compatible)."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The model a server answers with, and what a dsvl2 server says about it (None from other servers)."""

    name: str
    revision: str | None = None
    fingerprint: str | None = None
    device: str | None = None
    dtype: str | None = None
    context: int | None = None
    quantize: str = "none"


def base_url(url: str) -> str:
    """`http://host:8000`, `.../` or `.../v1` → the API root the client wants (`.../v1`)."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def served_model(client: Any, name: str | None, url: str) -> ServedModel:
    """The served model called `name`, or the server's only one when `name` is None."""
    import openai

    try:
        listed = list(client.models.list())
    except openai.APIStatusError as exc:
        raise ServerError(f"{url}: GET /v1/models answered {exc.status_code}: {exc.message}") from None
    except openai.APIConnectionError as exc:
        raise ServerError(f"{url}: cannot connect ({exc.__cause__ or exc})") from None
    names = [m.id for m in listed]
    if name is None:
        if len(listed) != 1:
            raise ServerError(f"{url} serves {len(listed)} models ({', '.join(names) or 'none'}): choose one "
                              "with --server-model")
        chosen = listed[0]
    else:
        chosen = next((m for m in listed if m.id == name), None)
        if chosen is None:
            raise ServerError(f"{url} does not serve {name!r} (it serves: {', '.join(names) or 'none'})")
    extra = getattr(chosen, "model_extra", None) or {}
    ours = extra.get("dsvl2") or {}
    return ServedModel(chosen.id, ours.get("revision"), ours.get("fingerprint"), ours.get("device"),
                       ours.get("dtype"), extra.get("max_model_len"), ours.get("quantize") or "none")


def chat_messages(conversation: Sequence[Message]) -> list[dict[str, Any]]:
    """The conversation (its last, empty assistant turn left out) as OpenAI chat messages; a dsvl2 server
    turns each image part back into `<image>\\n`, so the prompt is the one the local processor sees."""
    messages: list[dict[str, Any]] = []
    for turn in conversation[:-1]:
        if turn.role == ASSISTANT:
            messages.append({"role": "assistant", "content": turn.content})
            continue
        parts: list[dict[str, Any]] = []
        pieces = turn.content.split(IMAGE_TOKEN)
        for k, piece in enumerate(pieces):
            if k > 0:
                parts.append({"type": "image_url", "image_url": {"url": png_data_url(turn.images[k - 1])}})
                piece = piece.removeprefix("\n")  # the server writes the placeholder with its newline
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": parts})
    return messages


def png_data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless: the server sees the local path's pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def request_body(request: Request, model: str) -> dict[str, Any]:
    """Keyword arguments of `chat.completions.create` for one request."""
    s = request.sampling
    extra: dict[str, Any] = {}
    if s.repetition_penalty != 1.0:
        extra["repetition_penalty"] = s.repetition_penalty
    if s.no_repeat_ngram:
        extra |= {"no_repeat_ngram": s.no_repeat_ngram, "repeat_window": s.repeat_window}
    body: dict[str, Any] = {"model": model, "messages": chat_messages(request.conversation),
                            "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                            "seed": s.seed}
    if s.stop:
        body["stop"] = list(s.stop)
    if extra:
        body["extra_body"] = extra
    return body


def connect(options: Any) -> RemoteRuntime:
    """The runtime for a run's `--server` options (dsvl2.options.Options); the API key from `--api-key-env`."""
    return RemoteRuntime(options.server, model=options.server_model, api_key=os.environ.get(options.api_key_env),
                         max_concurrent=options.max_concurrent, timeout=options.request_timeout,
                         max_retries=options.max_retries)


class RemoteRuntime:
    """Implements `dsvl2.pipelines.base.Runtime` over HTTP. `step` waits (briefly) for answers to come back."""

    def __init__(self, urls: Sequence[str], *, model: str | None = None, api_key: str | None = None,
                 max_concurrent: int = 8, timeout: float = 600.0, max_retries: int = 3) -> None:
        import openai

        if not urls:
            raise ServerError("no server URL given")
        self.urls = [u.strip().rstrip("/").removesuffix("/v1") for u in urls]  # the server, as records name it
        self._clients = [openai.OpenAI(base_url=base_url(u), api_key=api_key or "none", timeout=timeout,
                                       max_retries=max_retries) for u in self.urls]
        models = [served_model(c, model, u) for c, u in zip(self._clients, self.urls, strict=True)]
        names = {m.name for m in models}
        if len(names) > 1:
            raise ServerError(f"the servers serve different models ({', '.join(sorted(names))}): choose one with "
                              "--server-model")
        prints = {m.fingerprint for m in models}
        if len(prints) > 1:
            raise ServerError("the servers serve different checkpoints (their fingerprints differ)")
        self.served = models[0]
        self.identity = Identity(model=self.served.name, revision=self.served.revision,
                                 fingerprint=self.served.fingerprint, device=self.served.device or "remote",
                                 dtype=self.served.dtype or "unknown", quantize=self.served.quantize)
        self.max_batch_size = max_concurrent
        self.load_seconds, self.kernels = 0.0, None  # nothing is loaded here
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="dsvl2-remote")
        self._pending: dict[str, Future[Completion]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._turn = itertools.count()

    @property
    def model_id(self) -> str:
        return self.served.name

    def identify(self, *_: Any, **__: Any) -> Identity:
        """The run's identity is the served model's, whatever --model says (dsvl2.backend.identify's seam)."""
        return self.identity

    @property
    def revision(self) -> str | None:
        return self.served.revision

    def submit(self, request: Request) -> None:
        index = next(self._turn) % len(self._clients)
        with self._lock:
            if request.id in self._pending:
                raise ValueError(f"request id {request.id!r} is already in flight; ids must be unique among them")
            self._pending[request.id] = self._pool.submit(self._ask, index, request)

    def step(self) -> list[Completion]:
        with self._lock:
            futures = list(self._pending.values())
        if not futures:
            return []
        wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
        done: list[Completion] = []
        with self._lock:
            for request_id, future in list(self._pending.items()):
                if future.done():
                    del self._pending[request_id]
                    done.append(future.result())
        return done

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def cancel(self, request_id: str) -> None:
        """A request not started yet is dropped; one on the wire finishes (HTTP cannot take it back)."""
        with self._lock:
            self._cancelled.add(request_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients:
            client.close()

    def _ask(self, index: int, request: Request) -> Completion:
        import openai

        url = self.urls[index]
        start = time.perf_counter()
        with self._lock:
            if request.id in self._cancelled:
                self._cancelled.discard(request.id)
                return _failed(request, "cancelled", url, start, reason="cancelled")
        try:
            response = self._clients[index].chat.completions.create(**request_body(request, self.served.name))
        except openai.APIStatusError as exc:
            return _failed(request, f"{url} answered {exc.status_code}: {_message(exc)}", url, start)
        except openai.APIConnectionError as exc:
            return _failed(request, f"{url}: {exc.__cause__ or exc}", url, start)
        except Exception as exc:  # an unexpected response shape: that page's error, not the run's
            return _failed(request, f"{url}: {type(exc).__name__}: {exc}", url, start)
        choice = response.choices[0]
        reason = choice.finish_reason or "stop"
        finish = _FINISH_BACK.get(reason, "stop" if request.sampling.stop else "eos")
        usage = response.usage
        return Completion(
            id=request.id, token_ids=(), text=choice.message.content or "", finish_reason=finish,
            n_prompt=usage.prompt_tokens if usage else 0, n_generated=usage.completion_tokens if usage else 0,
            timings=Timings(decode=time.perf_counter() - start), origin=url,
        )


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(getattr(exc, "message", exc))


def _failed(request: Request, error: str, url: str, start: float, *, reason: str = "error") -> Completion:
    return Completion(id=request.id, token_ids=(), text="", finish_reason=reason, n_prompt=0, n_generated=0,
                      timings=Timings(decode=time.perf_counter() - start), origin=url, error=error)

