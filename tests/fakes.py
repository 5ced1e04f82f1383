"""Test doubles for the CLI and pipeline tests: a scripted runtime (in the spirit of llm's
`MockModel.enqueue`), helpers that make small PDFs and images, and environment isolation.

`FakeRuntime` implements the runtime's submit / step protocol. It answers requests from a queue of
scripted answers (text, finish reason, or an exception that fails the whole step it lands in), falling
back to `default`. An answer is bound to a request id the first time the id is seen, so the runner's
one-at-a-time retry of a failed step meets the same script. Each `step` runs every request in flight
(recorded in `batches`); a request finishes in its first step unless scripted to take `steps` steps. A
scripted answer may take `seconds` (answered one after another, like an engine with one row); `cancel`
stops it early with finish reason "cancelled", as `dsvl2.model.engine.Engine.cancel` does. `fits` makes
every step with more than that many requests in flight fail the way torch reports an out-of-memory error;
a failed step drops every request in flight, as the engine does.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pymupdf
from PIL import Image

from dsvl2.backend import Identity
from dsvl2.model.requests import Completion, Request, Timings


@dataclass(frozen=True, slots=True)
class Scripted:
    text: str = ""
    finish_reason: str = "eos"
    error: BaseException | None = None
    seconds: float = 0.0
    steps: int = 1


class FakeRuntime:
    """Implements pipelines.base.Runtime without a model."""

    def __init__(
        self,
        default: str | Callable[[Request], str] = "fake answer",
        *,
        model_id: str = "fake/dsvl2",
        revision: str | None = "fake-rev",
        reverse: bool = False,
        max_batch_size: int | None = None,
        fits: int | None = None,
        delay: float = 0.0,
    ) -> None:
        self.default = default
        self.model_id, self.revision = model_id, revision
        self.identity = Identity(model_id, revision, None, "cpu", "float32")  # as dsvl2.Runtime has one
        self.load_seconds, self.kernels, self.paths = 0.0, None, None
        self.reverse = reverse  # return each step's completions in reverse order, as an engine may finish them
        self.max_batch_size = max_batch_size or 0  # 0: let the caller choose
        self.queue: deque[Scripted] = deque()
        self.bound: dict[str, Scripted] = {}
        self.requests: list[Request] = []
        self.batches: list[list[str]] = []  # the ids in flight at each step
        self.in_flight: list[Request] = []
        self.progress: dict[str, int] = {}
        self.load_args: dict | None = None
        self.fits, self.delay = fits, delay
        self.cancelled: set[str] = set()
        self._lock = threading.Lock()

    def enqueue(
        self,
        text: str = "",
        *,
        finish_reason: str = "eos",
        error: BaseException | None = None,
        seconds: float = 0.0,
        steps: int = 1,
    ) -> FakeRuntime:
        self.queue.append(Scripted(text, finish_reason, error, seconds, steps))
        return self

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self.cancelled.add(request_id)

    def _wait(self, request_id: str, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the request was cancelled meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with self._lock:
                if request_id in self.cancelled:
                    return True
            time.sleep(min(0.005, max(end - time.monotonic(), 0)))
        return False

    @property
    def prompts(self) -> list[str]:
        """The text of each request's user turn, without the image placeholder."""
        return [r.conversation[0].content.removeprefix("<image>\n") for r in self.requests]

    def _script(self, request: Request) -> Scripted:
        if request.id not in self.bound:
            if self.queue:
                self.bound[request.id] = self.queue.popleft()
            else:
                text = self.default(request) if callable(self.default) else self.default
                self.bound[request.id] = Scripted(text, seconds=self.delay)
        return self.bound[request.id]

    def submit(self, request: Request) -> None:
        if any(r.id == request.id for r in self.in_flight):
            raise ValueError(f"request id {request.id!r} is already in flight")
        self.in_flight.append(request)
        self.requests.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.in_flight)

    def step(self) -> list[Completion]:
        running = list(self.in_flight)
        self.batches.append([r.id for r in running])
        scripts = [self._script(r) for r in running]
        failure = next((s.error for s in scripts if s.error is not None), None)
        if self.fits is not None and len(running) > self.fits:
            failure = RuntimeError(f"CUDA out of memory. Tried to allocate {len(running)} GiB (fake)")
        if failure is not None:
            self.in_flight.clear()
            raise failure
        completions = []
        for r, s in zip(running, scripts, strict=True):
            self.progress[r.id] = self.progress.get(r.id, 0) + 1
            unfinished = self.progress[r.id] < s.steps
            if unfinished and r.id not in self.cancelled:
                continue
            text, reason = s.text, s.finish_reason
            if unfinished or (s.seconds and self._wait(r.id, s.seconds)):
                text, reason = text[: len(text) // 2], "cancelled"
            self.in_flight.remove(r)
            self.progress.pop(r.id)
            completions.append(
                Completion(
                    r.id,
                    (1, 2, 3),
                    text,
                    reason,
                    n_prompt=100,
                    n_generated=len(text.split()) + 1,
                    timings=Timings(0.0, 0.01, 0.02),
                )
            )
        return completions[::-1] if self.reverse else completions


def identify_for(fake: FakeRuntime) -> Callable[..., Identity]:
    """A `dsvl2.backend.identify` for the fake: the model as given, the fake's revision, no fingerprint, and
    "auto" resolved to cpu / float32."""

    def identify(model: str, *, revision: str | None = None, device: str = "auto", dtype: str = "auto",
                 quantize: str = "none") -> Identity:
        return Identity(model, fake.revision, None, "cpu" if device == "auto" else device.split(":")[0],
                        "float32" if dtype == "auto" else dtype, quantize)  # fmt: skip

    return identify


def use_fake(monkeypatch, fake: FakeRuntime) -> FakeRuntime:
    """Put `fake` behind the CLI's and the API's doors into the runtime (dsvl2.backend)."""
    from dsvl2 import backend

    monkeypatch.setattr(backend, "runtime_factory", factory_for(fake))
    monkeypatch.setattr(backend, "identify", identify_for(fake))
    return fake


def factory_for(fake: FakeRuntime) -> Callable[..., FakeRuntime]:
    """A `runtime_factory` that hands out `fake` and records how it was asked for."""

    def load(
        model: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | None = None,
        quantize: str = "none",
        on_kernel_build: Callable[[], None] | None = None,
    ) -> FakeRuntime:
        fake.load_args = {
            "model": model,
            "revision": revision,
            "device": device,
            "dtype": dtype,
            "batch_size": batch_size,
        } | ({"quantize": quantize} if quantize != "none" else {})
        return fake

    return load


def make_pdf(
    path: Path,
    pages: int = 1,
    *,
    password: str | None = None,
    size: tuple[float, float] = (300, 400),
    label: str = "page",
) -> Path:
    """A small PDF whose page i reads '<label> i'."""
    doc = pymupdf.open()
    for i in range(1, pages + 1):
        page = doc.new_page(width=size[0], height=size[1])
        page.insert_text((20, 40), f"{label} {i}", fontsize=14)
    path.parent.mkdir(parents=True, exist_ok=True)
    if password:
        doc.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw=password + "-owner", user_pw=password)
    else:
        doc.save(path)
    doc.close()
    return path


def make_image(path: Path, size: tuple[int, int] = (64, 48), colour: str = "white", **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    return path


def isolate(monkeypatch, tmp_path: Path) -> None:
    """Point HOME and every model cache at a temp dir, go offline, and clear dsvl2's own env vars."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / ".cache" / "huggingface" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("DSVL2_MODEL", "DSVL2_PDF_PASSWORD", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def main() -> None:
    """`python tests/fakes.py ARGS...` is `dsvl2 ARGS...` on a FakeRuntime, for tests that need a real process
    (signals, pipes, memory). Environment: DSVL2_FAKE_DELAY seconds each request takes; DSVL2_FAKE_LOG a file
    that gets one line per request the model is asked; DSVL2_FAKE_RSS a file that gets the process's peak
    resident memory in KiB when it exits (VmHWM: unlike getrusage's ru_maxrss it does not carry over the
    parent's memory across fork and exec)."""
    import atexit
    import os
    import re

    from dsvl2 import backend
    from dsvl2.app import main as dsvl2

    log = os.environ.get("DSVL2_FAKE_LOG")
    rss = os.environ.get("DSVL2_FAKE_RSS")
    if rss:
        status = Path("/proc/self/status")
        atexit.register(
            lambda: Path(rss).write_text(re.search(r"VmHWM:\s*(\d+)", status.read_text())[1], encoding="utf-8")
        )

    def answer(request: Request) -> str:
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(request.id + "\n")
        return f"text of {request.id}"

    fake = FakeRuntime(answer, delay=float(os.environ.get("DSVL2_FAKE_DELAY", "0")))
    backend.runtime_factory = factory_for(fake)
    backend.identify = identify_for(fake)
    dsvl2()


def invoke(*args: str, input: bytes | str | None = None):
    """`dsvl2 ARGS` in-process through Typer's CliRunner (exceptions propagate)."""
    from typer.testing import CliRunner

    from dsvl2.app import app

    return CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)


def jsonl(text: str) -> list[dict]:
    """The records of JSON Lines text (blank lines ignored)."""
    import json

    return [json.loads(line) for line in text.splitlines() if line.strip()]


if __name__ == "__main__":
    main()
