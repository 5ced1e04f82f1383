"""Which implementation each operation family runs on this CPU: our compiled kernels or torch (oneDNN).

Responsible for the decision and its record: CPU features first (kernels switched off or unavailable, no
AVX512-BF16: torch; AMX: torch/oneDNN for the GEMM-bound families unless timing says otherwise), then a short
timed calibration of both candidates on the model's own shapes (`Trial`s, best of a few repeats), remembered in
a small JSON next to the kernel build, keyed by the CPU model, its relevant flags and the thread count, so a
later process reads it instead of timing again. The result is one `Paths` value (family -> "kernel" | "torch"
with the reason) that the model asks. Not responsible for building the kernels (kernel_build.py), for making the
trials (kernel_calibration.py) or for reading the environment (kernels.py passes in the build's status).

Cache file, one per machine key in the build's directory (`KernelStatus.directory`):
    choice-<key16>.json  {"version": 1, "cpu": ..., "flags": [...], "threads": N,
                          "timings": {"<family>|<shape>": {"kernel_s": ..., "torch_s": ...}, ...}}
A file that does not parse or has another layout is ignored and rewritten with fresh timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dsvl2.model.kernel_build import KernelStatus, write_atomic

Family = Literal["vision_gemm", "vision_attention", "prefill_attention", "prefill_experts", "decode_projections",
                 "decode_experts", "decode_attention", "layer_glue"]
# layer_glue: the norms, rotary embedding and cache writes around the products (kernels.rms_norm, rope, store_rows):
# a few KB each, where one call replaces several torch passes; no trial, the features decide.
FAMILIES: tuple[Family, ...] = ("vision_gemm", "vision_attention", "prefill_attention", "prefill_experts",
                                "decode_projections", "decode_experts", "decode_attention", "layer_glue")
Use = Literal["kernel", "torch"]

# Bound by the bf16 multiply rate rather than by reading weights: where AMX tiles run torch's oneDNN GEMMs at
# 800-1,900 GFLOP/s our AVX512 dot products lost (prefill 257 vs 324 tok/s on a Xeon with AMX).
GEMM_BOUND: frozenset[Family] = frozenset({"vision_gemm", "prefill_experts"})
# Families whose "kernel" is torch's own oneDNN op with a fused epilogue (kernels.linear_fused): no build needed.
NO_BUILD: frozenset[Family] = frozenset({"vision_gemm"})
AMX_MARGIN = 1.15  # with AMX a GEMM-bound family takes the kernel only when it is this much faster than torch
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16")
VERSION = 1
PREFIX = "choice-"


@dataclass(frozen=True, slots=True)
class Route:
    """What one family runs and why (e.g. "cpu: no avx512_bf16", "amx", "calibrated 1.30x")."""

    family: Family
    use: Use
    reason: str


@dataclass(frozen=True, slots=True)
class Paths:
    """The route of every family; `kernel(family)` is what the model asks."""

    routes: tuple[Route, ...]
    # The families that take the kernel: `kernel` is asked several times per layer and decode step.
    _kernel: frozenset[Family] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_kernel", frozenset(r.family for r in self.routes if r.use == "kernel"))

    @classmethod
    def uniform(cls, use: Use, reason: str) -> Paths:
        return cls(tuple(Route(f, use, reason) for f in FAMILIES))

    def route(self, family: Family) -> Route:
        return next(r for r in self.routes if r.family == family)

    def kernel(self, family: Family) -> bool:
        """True when `family` should run our kernel where it fits (the kernel's own checks still apply)."""
        return family in self._kernel

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {r.family: {"use": r.use, "reason": r.reason} for r in self.routes}

    def describe(self) -> str:
        """One line per family, for a benchmark or a verbose log."""
        return "\n".join(f"{r.family:<19} {r.use:<6} ({r.reason})" for r in self.routes)


UNCHOSEN = Paths.uniform("torch", "not chosen: the module is not part of a loaded model")


@dataclass(frozen=True, slots=True)
class Machine:
    """What a timing depends on besides the build: the CPU model, the flags that decide bf16 speed, the threads."""

    cpu: str
    flags: frozenset[str]
    threads: int

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    def key(self) -> str:
        text = f"{self.cpu}\0{' '.join(sorted(self.flags & set(RELEVANT_FLAGS)))}\0{self.threads}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Trial:
    """One family's calibration on the model's shapes: `shape` names the products (part of the cache key);
    `build()` makes the two zero-argument calls to time, (kernel, torch), only when no cached timing exists."""

    shape: str
    build: Callable[[], tuple[Callable[[], object], Callable[[], object]]]


Timer = Callable[[Callable[[], object]], float]  # seconds per call of a zero-argument function


def best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls after one warm-up call (first-touch and thread-pool start excluded)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def by_features(family: Family, machine: Machine, status: KernelStatus) -> Route | None:
    """The route where the machine alone decides it, else None (then timing, or the prior, decides)."""
    if status.state == "off":
        return Route(family, "torch", f"switched off: {status.reason}")
    if "avx512_bf16" not in machine.flags:
        return Route(family, "torch", "cpu: no avx512_bf16")
    if family not in NO_BUILD and not status.available:
        return Route(family, "torch", f"kernels unavailable: {status.reason}")
    return None


def prior(family: Family, machine: Machine) -> Route:
    """The route without a timing (no trial for this family, or nowhere to run it)."""
    if machine.amx and family in GEMM_BOUND:
        return Route(family, "torch", "amx")
    if family == "layer_glue":
        return Route(family, "kernel", "avx512_bf16: one call for several torch passes")
    return Route(family, "kernel", "avx512_bf16, not calibrated")


def from_timing(family: Family, machine: Machine, kernel_s: float, torch_s: float) -> Route:
    """Kernel when it is faster (by AMX_MARGIN for a GEMM-bound family on an AMX CPU), with the measured ratio."""
    amx = machine.amx and family in GEMM_BOUND
    ratio = torch_s / kernel_s if kernel_s > 0 else float("inf")
    if ratio > (AMX_MARGIN if amx else 1.0):
        return Route(family, "kernel", f"{'amx, ' if amx else ''}calibrated {ratio:.2f}x")
    return Route(family, "torch", f"{'amx, ' if amx else ''}calibrated: torch {1 / ratio:.2f}x")


def cache_file(directory: Path, machine: Machine, prefix: str = PREFIX) -> Path:
    """The timings file of `machine` in `directory`; `prefix` names whose timings they are (quant_choice keeps its
    own beside its build)."""
    return Path(directory) / f"{prefix}{machine.key()}.json"


def read_timings(path: Path, machine: Machine) -> dict[str, dict[str, float]] | None:
    """The timings recorded in `path` for `machine` ({key: {name: seconds}}); {} when there is no file, None when it
    is unreadable, corrupt or of another machine or layout (the caller measures again and rewrites it). A caller
    that finds an entry without the names it needs times that entry again."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("version") == VERSION and data.get("threads") == machine.threads
            and data.get("cpu") == machine.cpu and isinstance(data.get("timings"), dict)):
        return None
    timings = {}
    for key, entry in data["timings"].items():
        if not (isinstance(entry, dict) and entry and all(_seconds(v) for v in entry.values())):
            return None
        timings[key] = {name: float(v) for name, v in entry.items()}
    return timings


def _seconds(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def write_timings(path: Path, machine: Machine, new: Mapping[str, dict[str, float]]) -> None:
    """Add `new` to the file's timings (re-read first: another process may have added its own) and replace the
    file atomically. A cache that cannot be written costs only a timing in the next process."""
    merged = {**(read_timings(path, machine) or {}), **new}
    data = {"version": VERSION, "cpu": machine.cpu, "flags": sorted(machine.flags & set(RELEVANT_FLAGS)),
            "threads": machine.threads, "timings": merged}
    with contextlib.suppress(OSError):
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def decide(trials: Mapping[Family, Trial | str], *, machine: Machine, status: KernelStatus, cache: Path | None,
           timer: Timer = best_time) -> Paths:
    """The route of every family: by features where they decide; else from the cached timing of its trial, or a
    new timing (recorded in `cache`, a directory, when given); a family mapped to a string has no kernel for the
    model's shapes (torch, that reason); families without a trial take the prior. A kernel that raises during its
    trial sends the family to torch."""
    path = cache_file(cache, machine) if cache is not None else None
    known = (read_timings(path, machine) if path is not None else {}) or {}
    fresh: dict[str, dict[str, float]] = {}
    routes = []
    for family in FAMILIES:
        route = by_features(family, machine, status)
        trial = trials.get(family)
        if route is None and isinstance(trial, str):
            route = Route(family, "torch", trial)
        if route is None and trial is None:
            route = prior(family, machine)
        if route is None:
            key = f"{family}|{trial.shape}"
            timing = known.get(key)
            if timing is None or not {"kernel_s", "torch_s"} <= timing.keys():
                try:
                    kernel_fn, torch_fn = trial.build()
                    timing = fresh[key] = {"kernel_s": timer(kernel_fn), "torch_s": timer(torch_fn)}
                except RuntimeError as exc:
                    line = str(exc).strip().partition("\n")[0][:120]
                    route = Route(family, "torch", f"kernel failed in calibration: {line}")
            if route is None:
                route = from_timing(family, machine, timing["kernel_s"], timing["torch_s"])
        routes.append(route)
    if fresh and path is not None:
        write_timings(path, machine, fresh)
    return Paths(tuple(routes))
