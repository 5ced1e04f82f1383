"""Build a torch C++ extension at most once per machine and load it: never hangs, never prints, remembers failures.

Responsible for the cache directory keyed by what the build depends on, the lock that lets one process build while
the others wait (with a timeout), a failure record, and keeping torch's and the compiler's output off the terminal.
Not responsible for which CPUs a library suits or when to use it (model/kernels.py), nor for telling the user:
`load_library` returns a `KernelStatus` and the caller reports it.

One directory per build key (the sources' and headers' bytes, the flags, torch's version and C++ ABI, the compiler,
the Python tag and the platform), so two installed versions never overwrite each other's build:

    <root>/<name>-<key16>/
        build.lock    flock'ed by the process that builds; the OS drops the lock when that process dies, however
                      it dies (a SIGKILL or an OOM kill leaves nothing that blocks the next run)
        <name>.so     the finished library, moved in (atomically) only once it built and loaded
        FAILED        why the build failed: a one-line summary, then the compiler's last lines; later processes
                      read it and fall back at once instead of spending the build time again (not written when
                      the compiler itself was killed, e.g. out of memory: that may succeed next time)
        choice-<k>.json  which of the library's kernels beat torch on this CPU (model/kernel_choice.py): timings
                      keyed by the CPU model, flags and thread count, written atomically, re-measured if corrupt
        build-*/      a build in progress: torch's ninja files, the objects and torch's own `lock` file (a plain
                      file that a killed builder leaves behind); every build starts in a fresh one and deletes those
                      a killed builder left, so a stale torch `lock` is never waited on

<root> is $TORCH_EXTENSIONS_DIR when set, else $XDG_CACHE_HOME/dsvl2/kernels (~/.cache/dsvl2/kernels).
To retry a failed build, delete its directory (`KernelStatus.directory`), or the whole root to rebuild everything.
A missing toolchain (no compiler, no ninja) is not recorded: installing one is enough.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

# How long a process waits for another live process's build of the same library before it gives up and falls back
# (the real kernels take ~20 s on a fast machine; a loaded build host can take minutes).
WAIT_SECONDS = 600.0
POLL_SECONDS = 0.1  # between attempts to take the build lock
FAILED_LINES = 20  # the compiler's last lines kept in a FAILED record
REASON_CHARS = 300  # at most this much of a summary line
LOCK_NAME = "build.lock"
FAILED_NAME = "FAILED"

State = Literal["built", "loaded", "failed", "unsupported", "off"]


@dataclass(frozen=True, slots=True)
class KernelStatus:
    """What became of a compiled library in this process.

    state: "built" (compiled here, then loaded), "loaded" (from the cache), "failed" (compile, load or lock-wait
    failure, or a failure recorded by an earlier process), "unsupported" (this machine cannot run it) or "off"
    (switched off by the user). `reason` is one line, set unless the library is available. `compiled` says whether
    this process ran the compiler. `build_seconds` is the time spent compiling here; `load_seconds` the rest
    (waiting for another process's build, loading, checking). `directory` is the build's cache directory."""

    state: State
    reason: str | None = None
    compiled: bool = False
    build_seconds: float = 0.0
    load_seconds: float = 0.0
    directory: str | None = None

    @property
    def available(self) -> bool:
        """True when the library is loaded and its ops can be called."""
        return self.state in ("built", "loaded")

    def describe(self) -> str:
        """One line for a user, e.g. for the CLI's stderr."""
        if self.state == "built":
            return f"CPU kernels built in {self.build_seconds:.1f} s (cached in {self.directory})"
        if self.state == "loaded":
            return f"CPU kernels loaded from the cache in {self.load_seconds:.1f} s"
        return f"CPU kernels unavailable, using torch ops: {self.reason}"


def cache_root() -> Path:
    """Where keyed build directories go: $TORCH_EXTENSIONS_DIR, else $XDG_CACHE_HOME/dsvl2/kernels."""
    if env := os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dsvl2" / "kernels"


def _compiler() -> tuple[str, str | None]:
    """torch's C++ compiler (CXX or c++) and its resolved path, None when it is not on PATH."""
    from torch.utils.cpp_extension import get_cxx_compiler

    cxx = get_cxx_compiler()
    found = shutil.which(cxx)
    return cxx, os.path.realpath(found) if found else None


def build_key(sources: Sequence[Path], *, cflags: Sequence[str] = (), ldflags: Sequence[str] = (),
              depends: Sequence[Path] = ()) -> str:
    """16 hex digits of a hash of everything the built library depends on: the bytes of `sources` and `depends`
    (by file name, so the same sources installed in two places share a build), the flags, torch's version and C++
    ABI, the compiler, the Python tag and the platform. Raises OSError when a file cannot be read."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode() + data)

    for kind, files in (("source", sources), ("depends", depends)):
        for path in files:
            add(f"{kind}:{Path(path).name}", Path(path).read_bytes())
    add("cflags", "\0".join(cflags).encode())
    add("ldflags", "\0".join(ldflags).encode())
    add("torch", f"{torch.__version__} {torch.version.git_version} {torch._C._GLIBCXX_USE_CXX11_ABI}".encode())
    add("compiler", " ".join(str(part) for part in _compiler()).encode())
    add("python", f"{sys.implementation.cache_tag} {sysconfig.get_platform()}".encode())
    return digest.hexdigest()[:16]


def build_directory(name: str, sources: Sequence[Path], *, cflags: Sequence[str] = (), ldflags: Sequence[str] = (),
                    depends: Sequence[Path] = (), root: Path | None = None) -> Path:
    """The cache directory of this build: `<root>/<name>-<build_key>` (root defaults to `cache_root()`)."""
    key = build_key(sources, cflags=cflags, ldflags=ldflags, depends=depends)
    return (root or cache_root()) / f"{name}-{key}"


def toolchain_problem() -> str | None:
    """Why nothing can be built here (no C++ compiler or no ninja), or None."""
    from torch.utils.cpp_extension import is_ninja_available

    cxx, path = _compiler()
    if path is None:
        return f"no C++ compiler ({cxx!r} is not on PATH)"
    if not is_ninja_available():
        return "no `ninja` executable (pip install ninja)"
    return None


class Library:
    """One optional compiled library of this package, built (or loaded from the cache) at most once per process:
    the first `status()` that finds it switched on and the CPU able to run it calls `load_library`; every later
    call returns that result without a lock. "off" and "unsupported" are answered at each call, never built."""

    def __init__(self, name: str, sources: Sequence[Path], *, cflags: Sequence[str], ldflags: Sequence[str],
                 check: Callable[[], object], cpu_flags: Sequence[str], depends: Sequence[Path] = ()) -> None:
        self.name, self.sources, self.depends, self.check = name, list(sources), list(depends), check
        self.cflags, self.ldflags, self.cpu_flags = list(cflags), list(ldflags), tuple(cpu_flags)
        self.loaded: KernelStatus | None = None  # the build or load, once per process
        self._lock = threading.Lock()

    def status(self, *, off: str | None, supported: bool,
               on_build_start: Callable[[], None] | None = None) -> KernelStatus:
        """`off`: why the user switched the library off (None: on); `supported`: whether this CPU has
        `cpu_flags`. `on_build_start` is called just before the compiler starts."""
        if off is not None:
            return KernelStatus("off", reason=off)
        if not supported:
            return KernelStatus("unsupported", reason=f"this CPU lacks one of {', '.join(self.cpu_flags)}")
        if (loaded := self.loaded) is not None:  # every product asks: no lock once loaded
            return loaded
        with self._lock:
            if self.loaded is None:
                self.loaded = load_library(self.name, self.sources, cflags=self.cflags, ldflags=self.ldflags,
                                           depends=self.depends, check=self.check, on_build_start=on_build_start)
            return self.loaded


def load_library(name: str, sources: Sequence[Path], *, cflags: Sequence[str] = (), ldflags: Sequence[str] = (),
                 depends: Sequence[Path] = (), check: Callable[[], object] | None = None,
                 timeout: float | None = None, root: Path | None = None,
                 on_build_start: Callable[[], None] | None = None) -> KernelStatus:
    """Load the shared library built from `sources` (a plain library registering torch ops, no Python module),
    building it first when no process has: one process compiles while the others wait on the lock, then load
    its result. `depends` are headers the sources include (hashed, not compiled); `check` runs after loading and
    raises if the library registered nothing usable; `on_build_start` is called when this process starts to
    compile (so a caller can tell its user). Waits at most `timeout` seconds (default WAIT_SECONDS) for another
    process's build. Never raises for a failed build and never prints: the returned status says what happened.
    Call it once per library and process (loading a library twice registers its ops twice)."""
    start = time.perf_counter()
    try:
        directory = build_directory(name, sources, cflags=cflags, ldflags=ldflags, depends=depends, root=root)
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return KernelStatus("failed", reason=_one_line(f"cannot prepare the build: {exc}"))
    if (done := _finished(name, directory, check, start)) is not None:
        return done
    if problem := toolchain_problem():
        return KernelStatus("failed", reason=problem, directory=str(directory))
    wait = WAIT_SECONDS if timeout is None else timeout
    try:
        with _flocked(directory / LOCK_NAME, wait):
            if (done := _finished(name, directory, check, start)) is not None:
                return done  # another process built it (or failed to) while this one waited
            if on_build_start is not None:
                on_build_start()
            return _build(name, sources, cflags, ldflags, check, directory, start)
    except TimeoutError:
        return KernelStatus("failed", reason=f"another process has been building in {directory} for over "
                            f"{wait:.0f} s; gave up waiting", load_seconds=time.perf_counter() - start,
                            directory=str(directory))
    except OSError as exc:  # the lock file or the work directory could not be made
        return KernelStatus("failed", reason=_one_line(f"cannot build in {directory}: {exc}"),
                            load_seconds=time.perf_counter() - start, directory=str(directory))


def _finished(name: str, directory: Path, check: Callable[[], object] | None, start: float) -> KernelStatus | None:
    """The status of a finished build in `directory` (loaded from the cache, or its recorded failure), else None."""
    library = directory / f"{name}{_lib_ext()}"
    if library.exists():
        try:
            torch.ops.load_library(str(library))
            if check is not None:
                check()
        except Exception as exc:  # a cached library that does not load: fall back, let a new key rebuild it
            return KernelStatus("failed", reason=_one_line(f"cannot load {library}: {type(exc).__name__}: {exc}"),
                                load_seconds=time.perf_counter() - start, directory=str(directory))
        return KernelStatus("loaded", load_seconds=time.perf_counter() - start, directory=str(directory))
    try:
        record = (directory / FAILED_NAME).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    summary = record.partition("\n")[0] or "unknown error"
    return KernelStatus("failed", reason=f"{summary} (an earlier build failed; delete {directory} to retry)",
                        load_seconds=time.perf_counter() - start, directory=str(directory))


def _build(name: str, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str],
           check: Callable[[], object] | None, directory: Path, start: float) -> KernelStatus:
    """Compile and load in a fresh work directory, then publish the library (or a FAILED record). Holds the lock."""
    from torch.utils import cpp_extension

    for stale in directory.glob("build-*"):  # a killed builder's work (and torch's `lock` file in it)
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=directory))
    output: list[str] = []
    compile_start = time.perf_counter()
    try:
        with _captured(output):
            library = cpp_extension.load(name=name, sources=[str(p) for p in sources], extra_cflags=list(cflags),
                                         extra_ldflags=list(ldflags), build_directory=str(work),
                                         is_python_module=False, verbose=False)
            if check is not None:
                check()
    except Exception as exc:  # compile, link, load or check error: record it, fall back
        build_seconds = time.perf_counter() - compile_start
        summary, record = _failure(exc, output)
        if not _KILLED.search(record):  # a compiler killed (e.g. out of memory) may succeed next time
            write_atomic(directory / FAILED_NAME, record)
        shutil.rmtree(work, ignore_errors=True)
        return KernelStatus("failed", reason=summary, compiled=True, build_seconds=build_seconds,
                            load_seconds=compile_start - start, directory=str(directory))
    build_seconds = time.perf_counter() - compile_start
    with contextlib.suppress(OSError):  # published only now, atomically; if it cannot be, the next process rebuilds
        os.replace(library, directory / f"{name}{_lib_ext()}")
    shutil.rmtree(work, ignore_errors=True)
    return KernelStatus("built", compiled=True, build_seconds=build_seconds, load_seconds=compile_start - start,
                        directory=str(directory))


@contextlib.contextmanager
def _flocked(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting at most `timeout` seconds (TimeoutError past it). The lock is
    tied to the open file, so the OS releases it when the holder exits or is killed; os.open's descriptor is not
    inherited by the compiler's processes, so an orphaned compiler does not hold it either."""
    import fcntl  # POSIX only; imported here so the module imports everywhere

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(path) from None
                time.sleep(POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # releases the lock


class _Collect(logging.Handler):
    """Collects log messages into a list instead of the terminal."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _captured(lines: list[str]) -> Iterator[None]:
    """Route torch.utils.cpp_extension's log messages and warnings into `lines` (the compiler's own output is
    piped by torch when verbose=False and arrives in the exception of a failed build)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    handler, propagate = _Collect(lines), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                lines.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


_KILLED = re.compile(r"Killed signal|signal terminated program")  # gcc's words for a compiler killed by a signal
_ERROR_LINE = re.compile(r"\berror:")  # gcc's and clang's "file:line:col: error: ..." (and "fatal error:")


def _failure(exc: BaseException, output: list[str]) -> tuple[str, str]:
    """(one-line summary, FAILED record) for a failed build: the summary is the compiler's first error line when
    there is one, else the exception's first line; the record adds the last FAILED_LINES lines of the output."""
    text = f"{type(exc).__name__}: {exc}"
    lines = [line.rstrip() for line in (*output, *text.splitlines()) if line.strip()]
    errors = [line for line in text.splitlines()[1:] if _ERROR_LINE.search(line)]
    summary = _one_line(errors[0] if errors else text)
    return summary, "\n".join([summary, "", *lines[-FAILED_LINES:]]) + "\n"


def _one_line(text: str) -> str:
    """The first line of `text`, at most REASON_CHARS long."""
    line = text.strip().partition("\n")[0].strip()
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3] + "..."


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the whole file or none (errors are ignored: a record here is an
    optimisation, a FAILED record's status or a kernel choice's timings are known to the caller already)."""
    with contextlib.suppress(OSError):
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}-",
                                         delete=False) as tmp:
            tmp.write(text)
        os.chmod(tmp.name, 0o644)  # readable by every user of a shared cache, like the library
        os.replace(tmp.name, path)


def _lib_ext() -> str:
    """The shared-library suffix torch's extension builder uses here (.so, or .pyd on Windows)."""
    from torch.utils.cpp_extension import LIB_EXT

    return LIB_EXT
