"""Test session setup: make the repository importable and report how many parity fixtures were checked."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_terminal_summary(terminalreporter) -> None:
    from parity import CHECKED

    if CHECKED:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(CHECKED.items()))
        terminalreporter.write_line(f"parity fixtures checked: {counts}")
