"""`--ray`: real Ray (one local instance for the module), the real runtime on the tiny parity checkpoint.
A Ray run must write what a local run writes (records per source, page and prompt), with a fixed pool, an
autoscaling one, or workers that send the pages to a `dsvl2 serve` server; survive a worker killed mid-run
with every page exactly once, resume after the driver is SIGKILLed without recomputing what was written, and
refuse a missing install, a bad address or an unreachable cluster with one line, exit 2. A bare `--ray`
means `--ray local`, and never swallows the input path after it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import corpus
import pytest
from fakes import invoke, make_pdf
from parity import PARITY_DIR, checkpoint_dir
from servers import Server

from dsvl2.inputs import display

CKPT = str(checkpoint_dir("tiny-mha"))
# Small pages and short answers keep the tiny model quick; -b 1 keeps several worker calls per run.
FAST = ("--model", CKPT, "--max-new-tokens", "6", "--max-side", "384", "-b", "1", "-q")
# Hostile files among good ones (tests/corpus.py): unreadable documents, pages that fail to render in a
# render task, odd names, next to good PDF pages and images.
CHOSEN = {
    "pdf/good.pdf", "pdf/truncated-head.pdf", "image/truncated.png", "image/bomb.png", "image/tiff-frame-bomb.tiff",
    "image/cmyk.jpg", "image/16-bit.png", "fs/dangling.pdf", "fs/fifo.pdf", "fs/loop-a.pdf", "fs/loop-b.pdf",
    "fs/" + corpus.NON_UTF8,
}  # fmt: skip


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module; the CLI's `--ray local` reuses this process's connection."""
    import ray

    from dsvl2 import ray_run
    from dsvl2.options import Options

    ray_run.start(Options(ray="local", workers="2"))
    yield ray
    ray.shutdown()


def records(out: Path) -> dict[tuple[str, int | None, str], dict]:
    """Every record under `out` by (source, page, prompt); a key seen twice fails."""
    found: dict[tuple[str, int | None, str], dict] = {}
    for path in sorted(out.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            key = (r["source"], r["page"], r["prompt"])
            assert key not in found, f"{key} recorded twice"
            found[key] = r
    return found


def answer(r: dict) -> tuple:
    return r["text"], r["result"], r["status"], r["error"]


def hostile_dir(root: Path) -> tuple[Path, list[corpus.Case]]:
    cases = [c for c in corpus.build(root) if c.path in CHOSEN]
    for dirpath, dirs, files in os.walk(root, topdown=True):
        for name in [*files, *dirs]:
            path = Path(dirpath, name)
            if (path.is_symlink() or not path.is_dir()) and str(path.relative_to(root)) not in CHOSEN:
                path.unlink()
    return root, cases


def assert_same_answers(mine: dict, theirs: dict) -> None:
    assert mine.keys() == theirs.keys(), f"pages differ: {sorted(mine.keys() ^ theirs.keys())}"
    unequal = [k for k in mine if answer(mine[k]) != answer(theirs[k])]
    assert not unequal, f"{len(unequal)} records differ, first {unequal[0]}: {answer(mine[unequal[0]])} vs " \
        f"{answer(theirs[unequal[0]])}"  # fmt: skip


def pages_dir(root: Path) -> Path:
    """A PDF of four pages and two images: six pages in all."""
    make_pdf(root / "doc.pdf", 4, label="page")
    for name in ("receipt_narrow_180x420.png", "photo_square_256x256.png"):
        shutil.copy(PARITY_DIR / "images" / name, root / name)
    return root


def test_ray_run_writes_what_a_local_run_writes(ray_local, tmp_path):
    root, cases = hostile_dir(tmp_path / "in")
    make_pdf(root / "more" / "letters.pdf", 2, label="letter")
    local = invoke("ocr", str(root), "-o", str(tmp_path / "local") + "/", *FAST)
    on_ray = invoke("ocr", str(root), "-o", str(tmp_path / "ray") + "/", *FAST, "--ray", "local", "--workers", "2")
    assert local.exit_code == on_ray.exit_code == 1, on_ray.output  # the hostile files fail, as they should
    mine, theirs = records(tmp_path / "local"), records(tmp_path / "ray")
    assert len(mine) == sum(c.records for c in cases) + 2
    assert_same_answers(mine, theirs)
    by_source = {}
    for (source, _, _), r in theirs.items():
        by_source.setdefault(source, []).append(r["status"])
    for case in cases:
        statuses = by_source[display(str(root / case.path))]
        assert len(statuses) == case.records, case.path
        if case.status == "failed":
            assert "failed" in statuses, case.path
    good = [k for k, r in theirs.items() if r["status"] != "failed"]
    assert len(good) == 3 + 1 + 1 + 1 + 1 + 2  # good.pdf, tiff frame 1, cmyk, 16-bit, non-UTF-8 name, letters
    manifest = json.loads((tmp_path / "ray" / "ocr.manifest.json").read_text())
    assert manifest["summary"] == {**json.loads((tmp_path / "local" / "ocr.manifest.json").read_text())["summary"],
                                   **{k: manifest["summary"][k] for k in ("seconds", "pages_per_minute",
                                                                          "tokens_per_second")}}  # fmt: skip


def test_an_autoscaling_pool_under_a_bare_ray_writes_what_a_local_run_writes(ray_local, tmp_path):
    """`--workers 1,2`: Ray Data's autoscaling actor pool (one worker, a second while there is a queue); `--ray`
    given last, alone, is `--ray local` and joins the module's instance."""
    root = pages_dir(tmp_path / "in")
    local = invoke("ocr", str(root), "-o", str(tmp_path / "local") + "/", *FAST)
    on_ray = invoke("ocr", str(root), "-o", str(tmp_path / "ray") + "/", *FAST, "--workers", "1,2", "--ray")
    assert local.exit_code == on_ray.exit_code == 0, on_ray.output
    mine = records(tmp_path / "local")
    assert len(mine) == 6
    assert_same_answers(mine, records(tmp_path / "ray"))
    runtime = json.loads((tmp_path / "ray" / "ocr.manifest.json").read_text())["runtime"]
    reports = runtime["ray"]["reports"]
    assert (runtime["batch_size"], runtime["final_batch_size"]) == (1, 1)  # the workers' -b 1
    assert 1 <= len(reports) <= 2 and all(r["loaded"] == "model" and r["load_seconds"] > 0 for r in reports)
    assert runtime["load_seconds"] == max(r["load_seconds"] for r in reports)
    assert runtime["ray"]["workers"] == {"min": 1, "max": 2}


def test_workers_in_front_of_a_server_load_no_model_and_ask_for_each_page_once(ray_local, tmp_path):
    """`--ray --server URL`: the workers send the pages to a `dsvl2 serve` process. It serves the checkpoint
    under a name no worker could load (not a directory, not a hub id), so a worker that tried to load the
    model would fail the run; the server's count of completions is the number of pages."""
    root = pages_dir(tmp_path / "in")
    server = Server(Path(CKPT), "--served-model-name", "served-tiny")
    try:
        local = invoke("ocr", str(root), "-o", str(tmp_path / "local") + "/", *FAST)
        on_ray = invoke("ocr", str(root), "-o", str(tmp_path / "ray") + "/", *FAST, "--server", server.url,
                        "--ray", "--workers", "2")  # fmt: skip
        status, health = server.get("/health")
    finally:
        server.stop()
    assert local.exit_code == on_ray.exit_code == 0, on_ray.output
    theirs = records(tmp_path / "ray")
    assert_same_answers(records(tmp_path / "local"), theirs)
    assert {(r["model"]["id"], r["model"]["server"]) for r in theirs.values()} == {("served-tiny", server.url)}
    assert status == 200 and health["engine"]["completed"] == len(theirs) == 6
    runtime = json.loads((tmp_path / "ray" / "ocr.manifest.json").read_text())["runtime"]
    assert {(r["loaded"], r["load_seconds"]) for r in runtime["ray"]["reports"]} == {("server", 0.0)}


def test_workers_report_what_they_loaded_and_send_the_pages_back_for_annotate(ray_local, tmp_path):
    """What only the workers know comes back with their answers: each worker's report (what it loaded, how long
    it took, the batch size it used) for the manifest, and with --annotate every answered page's pixels as it
    was rendered, for the driver to draw the boxes on. Driven through dsvl2.ray_run, as dsvl2.session does."""
    from dsvl2 import ray_run
    from dsvl2.job import Job
    from dsvl2.options import Options
    from dsvl2.pages import iter_pages
    from dsvl2.pipelines import runner
    from dsvl2.pipelines.tasks import TASKS

    make_pdf(tmp_path / "doc.pdf", 3, label="page")
    options = Options(model=CKPT, max_new_tokens=4, max_side=384, batch_size=2, annotate=tmp_path / "drawn",
                      ray="local", workers="2")  # fmt: skip
    job = Job.open(TASKS["ground"].from_options(query="page"), options, [str(tmp_path / "doc.pdf")])
    job.identify(ray_run.identify(options))
    workers = ray_run.Workers(options)
    done = [e for e in ray_run.events(job, is_done=lambda key: False, stats=runner.RunStats(), workers=workers)
            if isinstance(e, runner.RecordDone)]  # fmt: skip
    rendered = {p.number: p.image for p in iter_pages(job.opened, dpi=options.dpi, max_side=384, password=None)}
    assert [e.page.number for e in done] == [1, 2, 3]
    for event in done:
        image = event.page.image
        assert image is not None and image.tobytes() == rendered[event.page.number].tobytes(), event.page.number

    assert 1 <= len(workers.reports) <= 2
    for report in workers.reports.values():
        assert report.loaded == "model" and report.load_seconds > 0 and report.batch_size == 2
    entry = workers.manifest()
    assert (entry["batch_size"], workers.final_batch_size) == (2, 2)
    assert entry["load_seconds"] == max(r.load_seconds for r in workers.reports.values())
    assert entry["ray"]["workers"] == {"min": 2, "max": 2} and len(entry["ray"]["reports"]) == len(workers.reports)


def ocr_params(*args: str) -> dict:
    """What `dsvl2 ocr ARGS` parses to (the command as registered, with its --ray handling)."""
    from typer.main import get_command

    from dsvl2.app import app

    group = get_command(app)
    command = group.get_command(click.Context(group), "ocr")
    return command.make_context("ocr", list(args)).params


@pytest.mark.parametrize(
    ("args", "ray", "inputs"),
    [
        (["a.pdf", "--ray"], "local", ["a.pdf"]),
        (["--ray", "a.pdf"], "local", ["a.pdf"]),  # a path after a bare --ray stays a path
        (["--ray", "-"], "local", ["-"]),
        (["--ray", "--workers", "2", "a.pdf"], "local", ["a.pdf"]),
        (["-q", "--ray"], "local", []),
        (["--ray", "local", "a.pdf"], "local", ["a.pdf"]),
        (["--ray", "auto", "a.pdf"], "auto", ["a.pdf"]),
        (["--ray", "ray://head:10001", "a.pdf"], "ray://head:10001", ["a.pdf"]),
        (["--ray=ray://head:10001", "a.pdf"], "ray://head:10001", ["a.pdf"]),
        (["--ray", "head:6379", "a.pdf"], "head:6379", ["a.pdf"]),  # an address, refused by Options by name
        (["-o", "--ray", "a.pdf"], None, ["a.pdf"]),  # the value of -o, not the option
        (["a.pdf", "--", "--ray"], None, ["a.pdf", "--ray"]),
        (["a.pdf"], None, ["a.pdf"]),
    ],
)
def test_a_bare_ray_means_local_and_leaves_paths_alone(args, ray, inputs):
    params = ocr_params(*args)
    assert (params["ray"], list(params["inputs"] or [])) == (ray, inputs)


def _answerers() -> dict[int, bytes]:
    """pid → process title of every pool worker (Ray titles an actor's process `ray::Class.method` while busy)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().rstrip(b"\0")
            except OSError:
                continue
            if title.startswith(b"ray::") and b"Answerer" in title:
                found[int(entry.name)] = title
    return found


def test_a_killed_worker_is_restarted_and_no_page_is_lost_or_doubled(ray_local, tmp_path):
    make_pdf(tmp_path / "in" / "long.pdf", 16)
    killed: list[int] = []
    seen: set[int] = set()
    stop = threading.Event()

    def killer() -> None:  # kills the worker by its pid while it answers a batch, then watches the pool
        while not stop.is_set():
            workers = _answerers()
            seen.update(workers)
            busy = [pid for pid, title in workers.items() if title.endswith(b".submit")]
            if not killed and busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        # One worker: once it is killed, only its restart can answer the pages still to come.
        result = invoke("ocr", str(tmp_path / "in"), "-o", str(tmp_path / "out") + "/", *FAST, "--ray", "local",
                        "--workers", "1")  # fmt: skip
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was seen answering"
    assert result.exit_code == 0, result.output
    pages = [p for _, p, _ in records(tmp_path / "out")]
    assert sorted(pages) == list(range(1, 17))
    assert seen - set(killed), f"no worker replaced the killed one (workers seen: {sorted(seen)})"


def test_resume_after_the_driver_is_killed_recomputes_nothing(ray_local, tmp_path):
    pages = 24  # records come back a block of windows at a time: enough blocks that the kill lands mid-run
    make_pdf(tmp_path / "in" / "long.pdf", pages)
    args = ["ocr", "in", "-o", "out/", *FAST]
    journal = tmp_path / "out" / "long.pdf.ocr.jsonl.partial"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsvl2", *args, "--ray", "local", "--workers", "1"], cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < 1):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
    proc.wait(timeout=30)
    proc.stderr.close()
    done = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 1 <= len(done) < pages

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        again = invoke(*args, "--resume", "--ray", "local", "--workers", "2")
    finally:
        os.chdir(cwd)
    assert again.exit_code == 0, again.output
    assert sorted(p for _, p, _ in records(tmp_path / "out")) == list(range(1, pages + 1))
    summary = json.loads((tmp_path / "out" / "ocr.manifest.json").read_text())["summary"]
    counts = ("pages_skipped", "pages_per_minute")
    answered = sum(n for k, n in summary.items() if k.startswith("pages_") and k not in counts)
    assert (summary["pages_skipped"], answered) == (len(done), pages - len(done))


def test_missing_ray_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    make_pdf(tmp_path / "a.pdf")
    result = invoke("ocr", str(tmp_path / "a.pdf"), "-o", str(tmp_path / "out") + "/", "--ray", "local")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --ray needs Ray (ray is not installed): pip install 'dsvl2[ray]'"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray=somewhere"], "error: usage: --ray must be local, auto or ray://HOST:PORT"),
        (["--ray", "somewhere:6379"], "error: usage: --ray must be local, auto or ray://HOST:PORT"),
        (["--ray", "local", "--workers", "3,1"], "error: usage: --workers must be N or MIN,MAX"),
        (["--workers", "2"], "error: usage: --workers needs --ray"),
    ],
)
def test_bad_ray_options_are_one_line_and_exit_2(tmp_path, args, message):
    make_pdf(tmp_path / "a.pdf")
    result = invoke("ocr", str(tmp_path / "a.pdf"), "-o", str(tmp_path / "out") + "/", *args)
    assert result.exit_code == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_unreachable_cluster_is_one_line_and_exit_2(tmp_path):
    make_pdf(tmp_path / "a.pdf")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "dsvl2", "ocr", "a.pdf", "-o", "out/", "--model", CKPT, "--ray", "ray://127.0.0.1:9"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: --ray ray://127.0.0.1:9: cannot reach the Ray cluster")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
