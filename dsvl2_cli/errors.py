"""Exit codes, and the map from an exception to one line on stderr and its exit code.

0: every page ok (truncated / repetition pages are warnings, not failures); 1: some pages failed or could
not be parsed; 2: usage or setup error (bad options, model or output problems) before any page work, or a
run stopped because the batch size the user fixed does not fit in memory; 130: interrupted (Ctrl-C or
SIGTERM). Whenever a run stops, everything finished so far is kept for `--resume`.
"""

from __future__ import annotations

import re
from enum import IntEnum

from dsvl2.model.errors import (
    ConfigError,
    DeviceError,
    InputError,
    ModelError,
    ModelNotFoundError,
    TokenizerError,
    WeightsError,
)
from dsvl2.pipelines.base import OptionError
from dsvl2.pipelines.limits import OutOfMemory


class ExitCode(IntEnum):
    OK = 0
    PAGES_FAILED = 1
    SETUP = 2
    INTERRUPTED = 130


class UsageError(Exception):
    """Options or inputs that cannot work together; reported before any page is processed."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, turned into an orderly stop (see dsvl2.signals)."""


class OutputError(ValueError):
    """An output path that would leave the output directory or overwrite an input; found before any page
    is processed."""


_MODEL_LABELS: tuple[tuple[type[ModelError], str], ...] = (
    (ModelNotFoundError, "model not found"),
    (ConfigError, "model config"),
    (DeviceError, "device"),
    (WeightsError, "model weights"),
    (TokenizerError, "tokenizer"),
    (InputError, "model input"),
    (ModelError, "model"),
)


def describe(exc: BaseException) -> tuple[str, ExitCode] | None:
    """(one-line message, exit code) for errors the CLI reports without a traceback; None for bugs."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", ExitCode.INTERRUPTED
    if isinstance(exc, BrokenPipeError):  # e.g. `dsvl2 ... | head`: the reader stopped the run
        return "the output was closed before the run finished", ExitCode.INTERRUPTED
    if isinstance(exc, OptionError):
        return f"usage: {exc.flag} {exc.problem}", ExitCode.SETUP
    if isinstance(exc, UsageError):
        return f"usage: {exc}", ExitCode.SETUP
    if isinstance(exc, OutputError):
        return f"output: {exc}", ExitCode.SETUP
    if isinstance(exc, OutOfMemory):
        return f"out of memory: {exc}", ExitCode.SETUP
    if type(exc).__name__ == "ServerError" and type(exc).__module__ == "dsvl2.remote":  # not imported: no openai
        return f"server: {exc}", ExitCode.SETUP
    for kind, label in _MODEL_LABELS:
        if isinstance(exc, kind):
            return f"{label}: {exc}", ExitCode.SETUP
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("dsvl2.model"):
        return f"the model runtime is not available ({exc.name} is missing)", ExitCode.SETUP
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", ExitCode.SETUP
    return None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str, limit: int = 500) -> str:
    """`text` on one line for stderr: whitespace collapsed, control characters (a terminal escape in a file
    name or a model error) shown as `\\xNN`, at most `limit` characters."""
    flat = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", " ".join(str(text).split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
