"""dsvl2: batch document understanding with DeepSeek-VL2, as a command line (`dsvl2 ocr report.pdf`) and as
a Python API over the same code path:

    import dsvl2
    rt = dsvl2.load("deepseek-ai/deepseek-vl2-tiny")          # once; reuse across calls
    records = list(dsvl2.ocr("report.pdf", runtime=rt, pages="1-3"))
    df = dsvl2.to_dataframe(dsvl2.table("invoices/", runtime=rt))

Task functions (`ocr`, `table`, `chart`, `ground`, `ask`, or `run(task, ...)`) return an iterator of page
records (dicts, exactly the CLI's JSONL records). The API is imported on first use, so `import dsvl2` and
`dsvl2 --help` stay fast. Subpackages: `dsvl2.model` (the runtime), `dsvl2.pipelines` (tasks, runner).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsvl2.api import ask, chart, ground, load, ocr, run, table, tables, to_dataframe
    from dsvl2.backend import Runtime
    from dsvl2.pipelines.base import OptionError
    from dsvl2.pipelines.tasks import TASKS

__version__ = "0.1.0"
_EXPORTS = {
    **dict.fromkeys(("ask", "chart", "ground", "load", "ocr", "run", "table", "tables", "to_dataframe"), "dsvl2.api"),
    "Runtime": "dsvl2.backend",
    "OptionError": "dsvl2.pipelines.base",
    "TASKS": "dsvl2.pipelines.tasks",
}
__all__ = [
    "TASKS",
    "OptionError",
    "Runtime",
    "ask",
    "chart",
    "ground",
    "load",
    "ocr",
    "run",
    "table",
    "tables",
    "to_dataframe",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsvl2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
