"""Test session setup: make the repository importable and report how many parity fixtures were checked."""

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_terminal_summary(terminalreporter) -> None:
    from parity import CHECKED

    if CHECKED:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(CHECKED.items()))
        terminalreporter.write_line(f"parity fixtures checked: {counts}")


@pytest.fixture(scope="module")
def processor():
    """The processor of the first parity checkpoint (all parity checkpoints share one setup)."""
    from parity import checkpoint_dir, checkpoint_names, require

    from model.processor import Processor

    return Processor.from_dir(checkpoint_dir(require(checkpoint_names(), "parity checkpoints")[0]))


@pytest.fixture(scope="module")
def tokenizer():
    """The parity fixtures' test tokenizer (real special tokens, synthetic vocabulary)."""
    from parity import tokenizer_dir

    from model.tokenizer import Tokenizer

    return Tokenizer.from_dir(tokenizer_dir())


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A scripted FakeRuntime behind the CLI's runtime seam, in an isolated HOME and working directory."""
    from fakes import FakeRuntime, factory_for, isolate

    from dsvl2_cli import runtime as runtime_seam

    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    rt = FakeRuntime()
    monkeypatch.setattr(runtime_seam, "runtime_factory", factory_for(rt))
    return rt
