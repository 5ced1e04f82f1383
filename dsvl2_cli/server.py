"""`dsvl2 serve`: one loaded model behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

`EngineLoop` drives the runtime's `step()` on one thread; HTTP handlers submit requests to it and await their
completion (or, streaming, their tokens) on the event loop, so concurrent requests share the engine's
continuous batching. A client that disconnects cancels its request in the engine. The request dialect lives
in openai_api.py; this module owns transport, authentication, limits and lifecycle: `/health` says "loading"
(503) until the model is in, SIGTERM stops accepting and lets what is in flight finish (uvicorn's graceful
shutdown), and a request the engine fails is a 500 for that request while the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dsvl2.backend import Runtime
from dsvl2.model.requests import Completion
from dsvl2.model.requests import Request as EngineRequest
from dsvl2.openai_api import APIError, ChatCall, Limits, chunk_body, completion_body, new_id, parse_chat

API_KEY_ENV = "DSVL2_API_KEY"
MAX_BODY_BYTES = 64 * 2**20


@dataclass
class _Call:
    """One request in the engine, seen from the event loop."""

    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Completion]
    tokens: asyncio.Queue[list[int]] | None = None  # streaming: every new token list as the engine makes it
    sent: int = 0
    retried: bool = False


@dataclass
class EngineStats:
    """What the engine did, for `/health` and tests: steps run, and the most requests it answered at once."""

    steps: int = 0
    max_running: int = 0
    running: int = 0
    failures: int = 0
    cancelled: int = 0  # requests stopped because their client went away
    completed: int = 0  # requests answered (cancelled ones included)
    batch_sizes: dict[int, int] = field(default_factory=dict)  # rows running after a step -> how many steps


class EngineLoop:
    """Runs `runtime.step()` on its own thread while there is work; completions and streamed tokens go back
    to each request's event loop. A failed step dropped every request in it: those are run again one at a
    time (new requests wait meanwhile), so a request that fails alone ends with a 500 and no other does."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stats = EngineStats()
        self._calls: dict[str, _Call] = {}
        self._solo: deque[_Call] = deque()  # after a failed step: run these one by one
        self._held: list[EngineRequest] = []  # submitted while the solo runs go on
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsvl2-engine", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest, *, stream: bool) -> _Call:
        loop = asyncio.get_running_loop()
        call = _Call(request, loop, loop.create_future(), asyncio.Queue() if stream else None)
        with self._wake:
            self._calls[request.id] = call
            if self._solo:
                self._held.append(request)
            else:
                self.runtime.submit(request)
            self._wake.notify()
        return call

    def cancel(self, request_id: str) -> None:
        with self._wake:
            if request_id in self._calls:
                self.runtime.cancel(request_id)  # an id not in the engine yet is cancelled when it arrives

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self.runtime.has_work or self._solo or self._held):
                    self._wake.wait()
                if self._stopping:
                    return
                if not self.runtime.has_work:
                    if self._solo:
                        self.runtime.submit(self._solo.popleft().request)
                    else:
                        for request in self._held:
                            self.runtime.submit(request)
                        self._held.clear()
            try:
                finished = self.runtime.step()
            except Exception as exc:
                self._failed(exc)
                continue
            self._account()
            self._stream_tokens()
            for completion in finished:
                self.stats.cancelled += completion.finish_reason == "cancelled"
                self.stats.completed += 1
                self._resolve(completion.id, completion)

    def _failed(self, exc: Exception) -> None:
        self.stats.failures += 1
        with self._wake:
            held = {r.id for r in self._held}
            dropped = [c for c in self._calls.values() if c.request.id not in held and c not in self._solo]
            alone = len(dropped) == 1
            for call in dropped:
                if call.retried or alone:
                    self._resolve(call.request.id, exc, locked=True)
                else:
                    call.retried, call.sent = True, 0
                    self._solo.append(call)

    def _account(self) -> None:
        s = self.stats
        s.steps += 1
        s.running = self.runtime.engine.running
        s.max_running = max(s.max_running, s.running)
        s.batch_sizes[s.running] = s.batch_sizes.get(s.running, 0) + 1

    def _stream_tokens(self) -> None:
        with self._wake:
            streaming = [c for c in self._calls.values() if c.tokens is not None]
        for call in streaming:
            tokens = self.runtime.engine.progress(call.request.id)
            if tokens is not None and len(tokens) > call.sent:
                call.sent = len(tokens)
                call.loop.call_soon_threadsafe(call.tokens.put_nowait, list(tokens))

    def _resolve(self, request_id: str, outcome: Completion | BaseException, *, locked: bool = False) -> None:
        if locked:
            call = self._calls.pop(request_id, None)
        else:
            with self._wake:
                call = self._calls.pop(request_id, None)
        if call is None:
            return
        future = call.done

        def settle() -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        call.loop.call_soon_threadsafe(settle)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How `dsvl2 serve` answers: the model name it serves, the key it requires (None: open), request limits."""

    model_name: str
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = MAX_BODY_BYTES
    default_max_tokens: int | None = None  # None: up to the model's context


class _State:
    runtime: Runtime | None = None
    loop: EngineLoop | None = None
    error: str | None = None


def create_app(config: ServerConfig, load: Callable[[], Runtime], *, fetch: Callable[[str], bytes] | None = None,
               on_load_failed: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The ASGI app. `load` is called once, on a thread, at startup; until it returns `/health` answers 503.
    If it raises, `/health` says why and `on_load_failed` gets the exception (`serve` then stops)."""
    state = _State()

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        def loading() -> None:
            try:
                runtime = load()
            except Exception as exc:
                state.error = f"{type(exc).__name__}: {exc}"
                if on_load_failed is not None:
                    on_load_failed(exc)
                return
            state.loop, state.runtime = EngineLoop(runtime), runtime

        loader = threading.Thread(target=loading, name="dsvl2-load", daemon=True)
        loader.start()
        yield
        if state.loop is not None:
            state.loop.stop()

    app = FastAPI(title="dsvl2", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", kind="authentication_error")

    def ready() -> tuple[Runtime, EngineLoop]:
        if state.runtime is None or state.loop is None:
            raise APIError(503, f"the model failed to load: {state.error}" if state.error else
                           "the model is still loading", code="model_loading", kind="server_error")
        return state.runtime, state.loop

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.runtime is None or state.loop is None:
            status = "failed" if state.error else "loading"
            return JSONResponse({"status": status, "error": state.error}, status_code=503)
        stats = state.loop.stats
        return JSONResponse({"status": "ok", "model": config.model_name,
                             "engine": {"steps": stats.steps, "max_running": stats.max_running,
                                        "running": stats.running, "failures": stats.failures,
                                        "cancelled": stats.cancelled, "completed": stats.completed,
                                        "max_batch_size": state.runtime.max_batch_size}})

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        runtime, _ = ready()
        identity = runtime.identity
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "dsvl2",
            "max_model_len": runtime.engine.context,
            "dsvl2": {"model": identity.model, "revision": identity.revision, "fingerprint": identity.fingerprint,
                      "device": identity.device, "dtype": identity.dtype, "quantize": identity.quantize,
                      "max_batch_size": runtime.max_batch_size},
        }]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        authorize(request)
        body = await _read_json(request, config.max_body_bytes)
        runtime, loop = ready()
        call = await asyncio.to_thread(parse_chat, body, model=config.model_name, limits=config.limits, fetch=fetch)
        engine_request = await asyncio.to_thread(_budgeted, call, runtime, config.default_max_tokens)
        call_id = new_id()
        if call.stream:
            return StreamingResponse(_stream(loop, engine_request, call, call_id, config.model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pending = loop.submit(engine_request, stream=False)
        completion = await _until_done_or_gone(request, loop, pending)
        if completion is None:
            return JSONResponse({}, status_code=499)  # nobody is listening any more
        return JSONResponse(completion_body(completion, call_id=call_id, model=config.model_name))

    return app


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit:,} bytes", code="body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"request body over {limit:,} bytes", code="body_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _budgeted(call: ChatCall, runtime: Runtime, default_max_tokens: int | None) -> EngineRequest:
    """The engine request with its token budget: what the client asked for, refused when prompt plus budget
    exceed the context (OpenAI's `context_length_exceeded`); unasked, what the context leaves."""
    context = runtime.engine.context
    n_prompt = runtime.engine.processor.count_tokens(call.conversation)
    room = context - n_prompt
    if call.max_tokens is not None and call.max_tokens > room:
        raise APIError(400, f"the prompt has {n_prompt} tokens; with max_tokens {call.max_tokens} it passes the "
                       f"model's context of {context}", param="max_tokens", code="context_length_exceeded")
    if room < 1:
        raise APIError(400, f"the prompt has {n_prompt} tokens, past the model's context of {context}",
                       param="messages", code="context_length_exceeded")
    budget = call.max_tokens or min(room, default_max_tokens or room)
    return EngineRequest(new_id(), call.conversation, replace(call.sampling, max_new_tokens=budget))


async def _until_done_or_gone(request: Request, loop: EngineLoop, call: _Call) -> Completion | None:
    """The completion, or None once the client has gone (its request is then cancelled in the engine)."""
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(call.done), timeout=0.25)
        except TimeoutError:
            if await request.is_disconnected():
                loop.cancel(call.request.id)
                return None
        except Exception as exc:
            raise APIError(500, f"the engine failed on this request: {type(exc).__name__}: {exc}",
                           kind="server_error", code="engine_error") from None


async def _stream(loop: EngineLoop, engine_request: EngineRequest, call: ChatCall, call_id: str,
                  model: str) -> AsyncIterator[bytes]:
    """Server-sent events: the role, content deltas as tokens arrive (text held back while it could still be
    the start of a stop string or a half-decoded character), the finish reason, usage if asked, [DONE]."""
    created = int(time.time())
    tokenizer = loop.runtime.engine.processor.tokenizer
    hold = max((len(s) for s in call.sampling.stop), default=1) - 1
    pending = loop.submit(engine_request, stream=True)
    sent = 0

    def event(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    try:
        yield event(chunk_body(call_id=call_id, model=model, created=created, delta={"role": "assistant",
                                                                                     "content": ""}))
        while not pending.done.done():
            waiter = asyncio.ensure_future(pending.tokens.get())
            await asyncio.wait({waiter, pending.done}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                waiter.cancel()
                continue
            text = tokenizer.decode(waiter.result())
            ready = len(text) - hold
            while ready > sent and text[ready - 1] == "\ufffd":
                ready -= 1
            if ready > sent:
                yield event(chunk_body(call_id=call_id, model=model, created=created,
                                       delta={"content": text[sent:ready]}))
                sent = ready
        try:
            completion = pending.done.result()
        except Exception as exc:
            error = APIError(500, f"the engine failed on this request: {type(exc).__name__}: {exc}",
                             kind="server_error", code="engine_error")
            yield event(error.body())
            return
        if len(completion.text) > sent:
            yield event(chunk_body(call_id=call_id, model=model, created=created,
                                   delta={"content": completion.text[sent:]}))
        yield event(chunk_body(call_id=call_id, model=model, created=created,
                               finish_reason=completion.finish_reason))
        if call.include_usage:
            yield event(chunk_body(call_id=call_id, model=model, created=created, usage_of=completion))
        yield b"data: [DONE]\n\n"
    finally:
        if not pending.done.done():  # the client went away mid-stream
            loop.cancel(engine_request.id)


def fetch_image(url: str, *, limit: int, timeout: float = 20.0) -> bytes:
    """Download a remote image (only with --allow-remote-images), at most `limit` bytes."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"over {limit:,} bytes")
    return data


def serve(
    *,
    model: str,
    revision: str | None,
    device: str,
    dtype: str,
    batch_size: int | None,
    quantize: str = "none",
    host: str,
    port: int,
    config: ServerConfig,
    shutdown_timeout: float,
) -> int:
    """Load `model` and answer on http://host:port until SIGINT / SIGTERM, which stop new connections and give
    requests in flight `shutdown_timeout` seconds to finish (uvicorn's graceful shutdown). Logs go to stderr.
    Returns the exit code: 0 after a stop, 2 when the model cannot be loaded (one line on stderr)."""
    import uvicorn

    from dsvl2 import backend
    from dsvl2.errors import ExitCode, describe, one_line

    def load() -> Runtime:
        return backend.runtime_factory(model, revision=revision, device=device, dtype=dtype, batch_size=batch_size,
                                       quantize=quantize)

    failed: list[BaseException] = []

    def load_failed(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    limit = config.limits.max_image_bytes
    fetch = (lambda url: fetch_image(url, limit=limit)) if config.limits.allow_remote_images else None
    app = create_app(config, load, fetch=fetch, on_load_failed=load_failed)
    logging = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    logging["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout stays free of messages
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout,
                                           log_level="info", log_config=logging))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn hands SIGINT / SIGTERM back after an orderly stop
        server.run()
    if failed:
        known = describe(failed[0])
        message = known[0] if known else f"{type(failed[0]).__name__}: {failed[0]}"
        print(f"error: {one_line(message)}", file=sys.stderr)
        return int(ExitCode.SETUP)
    return int(ExitCode.OK)
