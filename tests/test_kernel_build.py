"""model/kernel_build.py in real processes, with a tiny torch op that compiles on any x86 CPU: a killed build never
blocks the next one, concurrent processes compile once, a failed build is remembered, waiting for a live build
times out, and the cache directory follows what the build depends on. The compiler is counted through a CXX
wrapper that logs every compile; the lock is the real flock."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsvl2.model import kernel_build

TINY = r"""
#include <torch/library.h>

at::Tensor twice(const at::Tensor& x) { return x.mul(2); }

TORCH_LIBRARY(dsvl2_build_test, m) { m.def("twice(Tensor x) -> Tensor", twice); }
"""
BROKEN = "int broken( {\n"
CFLAGS = ["-O0"]  # the build machinery is under test, not the code: compile fast

# One process of a program that uses the kernels: load (building if needed), call the op, report as JSON.
CHILD = r"""
import dataclasses, json, sys
from pathlib import Path
import torch
from dsvl2.model import kernel_build

def check():
    torch.ops.dsvl2_build_test.twice

status = kernel_build.load_library("tiny", [Path(sys.argv[1])], cflags=["-O0"], check=check,
                                   timeout=float(sys.argv[2]))
twice = torch.ops.dsvl2_build_test.twice(torch.tensor([1.0, 2.0, 3.0])).tolist() if status.available else None
print(json.dumps({"status": dataclasses.asdict(status), "twice": twice}), flush=True)
"""

# A live builder: holds the build lock until killed.
HOLD = """
import fcntl, sys, time
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""

pytestmark = pytest.mark.skipif(
    kernel_build.toolchain_problem() is not None, reason=f"cannot build here: {kernel_build.toolchain_problem()}"
)


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    """An empty extensions cache and a compiler that logs each compile (`-c`) to tmp_path/compiles, for the
    children and for this process (so `build_directory` here names the children's directory)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "g++"  # named like a compiler torch accepts without asking it for its version
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -c "*) echo "$$" >> "{tmp_path / "compiles"}";; esac\n'
                       f'exec {shutil.which(os.environ.get("CXX", "c++"))} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv("MAX_JOBS", raising=False)
    return dict(os.environ)


def compiles(tmp_path: Path) -> int:
    """How many times the compiler compiled a file so far."""
    log = tmp_path / "compiles"
    return len(log.read_text().split()) if log.exists() else 0


def source(tmp_path: Path, text: str, name: str = "tiny.cpp") -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def spawn(env: dict[str, str], src: Path, *, timeout: float = 120.0) -> subprocess.Popen:
    """A fresh process loading the tiny library (in its own session, so its compiler can be found and killed)."""
    return subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(timeout)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def result(proc: subprocess.Popen, *, within: float) -> dict:
    """The child's report; it must finish within `within` seconds and print nothing on stderr."""
    try:
        out, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the process did not finish within {within:.0f} s; stderr: {err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    assert err == "", f"library code wrote to stderr: {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_concurrent_processes_build_once_and_later_ones_load_the_cache(env, tmp_path):
    """Catches duplicate or clobbering builds: two processes started together compile once (the second waits on
    the lock, then loads the first one's library); a later process compiles nothing."""
    src = source(tmp_path, TINY)
    first, second = spawn(env, src), spawn(env, src)
    reports = [result(first, within=120), result(second, within=120)]
    assert sorted(r["status"]["state"] for r in reports) == ["built", "loaded"], reports
    assert all(r["twice"] == [2.0, 4.0, 6.0] for r in reports)
    assert compiles(tmp_path) == 1
    directory = Path(reports[0]["status"]["directory"])
    assert directory == kernel_build.build_directory("tiny", [src], cflags=CFLAGS)
    assert directory.parent == tmp_path / "extensions"
    assert sorted(p.name for p in directory.iterdir()) == [kernel_build.LOCK_NAME, "tiny.so"]  # no work left
    later = result(spawn(env, src), within=60)
    assert later["status"]["state"] == "loaded" and not later["status"]["compiled"] and later["twice"]
    assert compiles(tmp_path) == 1


def test_a_build_killed_midway_does_not_block_the_next_run(env, tmp_path):
    """Catches the hang the issue reported: a builder SIGKILLed during the compile leaves torch's plain `lock` file
    (and, here, its orphaned compiler still running); a fresh process must build and load within 60 s."""
    src = source(tmp_path, TINY)
    directory = kernel_build.build_directory("tiny", [src], cflags=CFLAGS)
    victim = spawn(env, src)
    try:
        deadline = time.monotonic() + 60
        while not list(directory.glob("build-*/lock")) and not compiles(tmp_path):  # torch's baton, the compiler
            assert victim.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)  # the builder only: its ninja and compiler live on as orphans
        victim.wait()
        assert list(directory.glob("build-*/lock")), "torch's lock file should be left behind, as after a kill"
        start = time.monotonic()
        fresh = result(spawn(env, src), within=60)
        assert fresh["status"]["state"] == "built" and fresh["twice"] == [2.0, 4.0, 6.0], fresh
        assert time.monotonic() - start < 60
        assert not list(directory.glob("build-*")), "the killed build's work directory should be cleared"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the killed builder's orphaned ninja and compiler
            os.killpg(victim.pid, signal.SIGKILL)


def test_a_failed_build_is_remembered_until_its_directory_is_deleted(env, tmp_path):
    """Catches paying the failed build again in every process: the first process reports the compiler's error;
    the next one reports it at once without compiling; deleting the directory retries."""
    src = source(tmp_path, BROKEN, "broken.cpp")
    first = result(spawn(env, src), within=60)["status"]
    assert first["state"] == "failed" and first["compiled"]
    assert "broken.cpp:1:" in first["reason"] and "error:" in first["reason"] and "\n" not in first["reason"]
    record = (Path(first["directory"]) / kernel_build.FAILED_NAME).read_text()
    assert record.startswith(first["reason"]) and "ninja: build stopped" in record
    assert len(record.splitlines()) <= kernel_build.FAILED_LINES + 2
    assert compiles(tmp_path) == 1
    second = result(spawn(env, src), within=60)["status"]
    assert second["state"] == "failed" and not second["compiled"] and compiles(tmp_path) == 1
    assert first["reason"] in second["reason"] and first["directory"] in second["reason"]
    assert second["load_seconds"] < 2
    shutil.rmtree(first["directory"])
    third = kernel_build.load_library("tiny", [src], cflags=CFLAGS)  # here: a failed build loads nothing
    assert third.state == "failed" and third.compiled and compiles(tmp_path) == 2


def test_waiting_for_a_live_build_gives_up_after_the_timeout(env, tmp_path):
    """Catches waiting forever on a build that never ends: while another live process holds the build lock, a
    process falls back after its timeout, with a reason, and never compiles."""
    src = source(tmp_path, TINY)
    directory = kernel_build.build_directory("tiny", [src], cflags=CFLAGS)
    directory.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory / kernel_build.LOCK_NAME)], text=True,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "held\n"
        started = []
        status = kernel_build.load_library("tiny", [src], cflags=CFLAGS, timeout=1.0,
                                           on_build_start=lambda: started.append(1))
    finally:
        holder.kill()
        holder.wait()
    assert status.state == "failed" and "gave up waiting" in status.reason and not status.compiled and not started
    assert 1.0 <= status.load_seconds < 5
    assert compiles(tmp_path) == 0 and not (directory / kernel_build.FAILED_NAME).exists()


def test_the_directory_follows_sources_headers_and_flags(tmp_path):
    """Catches two versions overwriting each other's build: any change to a source's or header's bytes or to the
    flags is a new directory; the same bytes elsewhere (another install) share one."""
    src = source(tmp_path, TINY)
    header = source(tmp_path, "#pragma once\n", "common.h")
    base = kernel_build.build_directory("tiny", [src], cflags=CFLAGS, depends=[header], root=tmp_path)
    assert base.parent == tmp_path and base.name.startswith("tiny-") and len(base.name) == len("tiny-") + 16
    copy = tmp_path / "elsewhere" / src.name
    copy.parent.mkdir()
    copy.write_text(TINY)
    assert kernel_build.build_directory("tiny", [copy], cflags=CFLAGS, depends=[header], root=tmp_path) == base
    assert kernel_build.build_directory("tiny", [src], cflags=["-O1"], depends=[header], root=tmp_path) != base
    header.write_text("#pragma once\n// changed\n")
    assert kernel_build.build_directory("tiny", [src], cflags=CFLAGS, depends=[header], root=tmp_path) != base
    header.write_text("#pragma once\n")
    src.write_text(TINY + "\n")
    assert kernel_build.build_directory("tiny", [src], cflags=CFLAGS, depends=[header], root=tmp_path) != base


def test_a_missing_compiler_falls_back_without_recording_a_failure(tmp_path, monkeypatch):
    """Installing a compiler later must be enough: no FAILED record, no build attempt, a one-line reason."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    src = source(tmp_path, TINY)
    started = []
    status = kernel_build.load_library("tiny", [src], root=tmp_path / "ext", on_build_start=lambda: started.append(1))
    assert status.state == "failed" and "no C++ compiler" in status.reason and not started
    assert not list((tmp_path / "ext").glob(f"*/{kernel_build.FAILED_NAME}"))
    assert status.reason in status.describe()
