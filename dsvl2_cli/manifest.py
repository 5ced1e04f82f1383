"""The run manifest: what was asked (command, task, prompts, settings, model, runtime limits), what was
read (inputs with hashes and page counts), what was written, how the run ended, and the summary. Written
atomically once per run, finished or not, next to the output."""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from dsvl2.errors import one_line
from dsvl2.inputs import Opened, Shard
from dsvl2.pipelines.base import SCHEMA_VERSION
from dsvl2.writers import atomic_write


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("dsvl2", "torch", "pymupdf", "pillow", "pandas", "typer"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def manifest_path(kind: str, path: Path | None, explicit: Path | None, task: str, shard: Shard | None) -> Path | None:
    """`--manifest`, else `DIR/<task>.manifest.json` or `FILE.manifest.json` (tagged with the shard); none
    for stdout."""
    if explicit is not None:
        return explicit
    tag = f".shard-{shard.index}-of-{shard.count}" if shard else ""
    if kind == "dir" and path is not None:
        return path / f"{task}{tag}.manifest.json"
    if kind == "file" and path is not None:
        return path.with_name(f"{path.name}{tag}.manifest.json")
    return None


@dataclass(frozen=True, slots=True)
class Ending:
    """How a run ended: `interrupted` (signal or closed pipe), `stopped_early` (--fail-fast), `error` (a
    resource error that stopped it, e.g. out of memory), and the batch size it ended with."""

    interrupted: bool = False
    stopped_early: bool = False
    error: str | None = None
    final_batch_size: int | None = None


def write_manifest(
    path: Path,
    *,
    task: str,
    prompts: Sequence[str],
    settings: dict[str, Any],
    model: dict[str, str | None],
    runtime: dict[str, Any],
    shard: Shard | None,
    output: dict[str, Any],
    started: str,
    ending: Ending,
    opened: Sequence[Opened],
    outputs: Sequence[Path],
    incomplete: Sequence[str],
    warnings: Sequence[str],
    summary: dict[str, Any],
) -> None:
    data = {
        "schema_version": SCHEMA_VERSION,
        "tool": "dsvl2",
        "versions": versions(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "task": task,
        "prompts": list(prompts),
        "settings": settings,
        "model": model,
        "runtime": {**runtime, "final_batch_size": ending.final_batch_size},
        "shard": f"{shard.index}/{shard.count}" if shard else None,
        "output": output,
        "started": started,
        "finished": now(),
        "interrupted": ending.interrupted,
        "stopped_early": ending.stopped_early,
        "error": ending.error,
        "inputs": [
            {
                "source": o.doc.source,
                "key": o.doc.key,
                "sha256": o.doc.sha256,
                "kind": o.doc.kind,
                "n_pages": o.doc.n_pages,
                "pages_selected": len(o.pages),
                "error": o.doc.error,
            }
            for o in opened
        ],
        "outputs": [str(p) for p in outputs],
        "incomplete": list(incomplete),
        "warnings": [one_line(w) for w in warnings],
        "summary": summary,
    }
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
