"""The quoted real answers of tests/data/real_answers/ (format: its README.md), shared by the tests that hold
each task's parser to them."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data" / "real_answers"
SOURCES = ("https://github.com/", "https://replicate.com/", "https://huggingface.co/", "https://arxiv.org/")


def cases(name: str) -> list[dict]:
    """The cases of one fixture file (`ground.json`, ...); an empty file is an error, never a silent pass."""
    items = json.loads((DATA / name).read_text(encoding="utf-8"))
    assert items, f"no cases in {name}"
    return items
