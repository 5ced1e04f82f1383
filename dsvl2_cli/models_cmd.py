"""`dsvl2 models download|list`: the model cache, through the seams in dsvl2.backend."""

from __future__ import annotations

import json
import sys
from typing import Any

from dsvl2 import backend
from dsvl2.errors import ExitCode
from dsvl2.progress import Reporter


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _fail(exc: BaseException) -> int:
    return Reporter(total_pages=0, total_docs=0, quiet=False, verbose=0).fail(exc)


def download(*, repo_id: str, revision: str | None) -> int:
    """Fetch a model into the cache; print its local directory on stdout."""
    try:
        path = backend.download_model(repo_id, revision=revision)
    except (Exception, KeyboardInterrupt) as exc:
        return _fail(exc)
    sys.stdout.write(f"{path}\n")
    return int(ExitCode.OK)


def _row(entry: Any) -> dict[str, Any]:
    """A cached model as a dict, from a (repo id, revision, size) tuple or an object with those attributes."""
    if isinstance(entry, tuple):
        repo_id, revision, size = entry[:3]
        return {"repo_id": repo_id, "revision": revision, "size_bytes": size}
    row = {"repo_id": entry.repo_id, "revision": entry.revision, "size_bytes": entry.size_bytes}
    for extra in ("refs", "path"):
        if hasattr(entry, extra):
            value = getattr(entry, extra)
            row[extra] = list(value) if isinstance(value, tuple) else str(value)
    return row


def list_models(*, as_json: bool) -> int:
    """Cached models on stdout: a table, or JSON with `--json`."""
    try:
        models = [_row(m) for m in backend.list_cached_models()]
    except (Exception, KeyboardInterrupt) as exc:
        return _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(models, indent=2) + "\n")
        return int(ExitCode.OK)
    width = max([len("MODEL")] + [len(m["repo_id"]) for m in models])
    lines = [f"{'MODEL':<{width}}  {'REVISION':<12}  {'REFS':<12}  SIZE"]
    lines += [
        f"{m['repo_id']:<{width}}  {m['revision'][:12]:<12}  {','.join(m.get('refs', [])) or '-':<12}  "
        f"{_size(m['size_bytes'])}"
        for m in models
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return int(ExitCode.OK)
