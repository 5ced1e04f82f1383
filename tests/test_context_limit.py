"""The model's context (`max_position_embeddings`) bounds prompt plus answer, on the tiny parity checkpoint and on
copies of it whose config gives a small context (so the cut is reached in a few tokens): the engine cuts a
request's budget to what its prompt leaves and says so in the completion, the record names the context when the
cut answer reaches it, and a prompt that alone does not fit fails its own page while the others go on, through
the engine and end to end through the CLI. Each docstring names the bug class its test catches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import isolate, make_image
from parity import PARITY_DIR, checkpoint_dir, parity_model, parity_processor
from PIL import Image
from typer.testing import CliRunner

from dsvl2.app import app
from dsvl2.model.engine import Engine, PromptTooLong
from dsvl2.model.processor import Processor
from dsvl2.model.requests import Completion, Request, Sampling, user_prompt
from dsvl2.model.weights import load_model
from dsvl2.pipelines.base import Document, Page, RecordContext, Settings, answered_record
from dsvl2.pipelines.ocr import OcrTask

CKPT = "tiny-mha"
A4 = (1190, 1684)  # an A4 page rendered at 144 dpi
PROMPT = "Convert the document to markdown."


def small_context_copy(root: Path, positions: int) -> Path:
    """The tiny checkpoint with `language_config.max_position_embeddings` set to `positions` (weights linked)."""
    src, dst = checkpoint_dir(CKPT), root / f"{CKPT}-context-{positions}"
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != "config.json":
            (dst / item.name).symlink_to(item)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["language_config"]["max_position_embeddings"] = positions
    (dst / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def a4_request(rid: str, max_new_tokens: int, **sampling) -> Request:
    page = Image.new("RGB", A4, "white")
    return Request(rid, user_prompt(PROMPT, (page,)), Sampling(max_new_tokens=max_new_tokens, **sampling))


def text_request(rid: str, words: int, max_new_tokens: int) -> Request:
    prompt = " ".join(f"word{i % 11}" for i in range(words))
    return Request(rid, user_prompt(prompt), Sampling(max_new_tokens=max_new_tokens, suppress_eos=True))


@pytest.fixture(scope="module")
def processor() -> Processor:
    assert (PARITY_DIR / "checkpoints" / CKPT).is_dir(), f"{CKPT} checkpoint not found under {PARITY_DIR}"
    return parity_processor(CKPT)


@pytest.fixture(scope="module")
def a4_tokens(processor: Processor) -> int:
    return processor.count_tokens(a4_request("a4", 1).conversation)


def small_engine(root: Path, positions: int, **options) -> Engine:
    path = small_context_copy(root, positions)
    return Engine(load_model(path), Processor.from_dir(path), **options)


# -- engine ------------------------------------------------------------------------------------------------
def test_the_context_is_read_from_the_config_and_cuts_an_a4_pages_budget(a4_tokens: int) -> None:
    """Catches a context taken from anywhere but the loaded model's config, and a budget left uncut: an A4 page
    asking for 3,000 new tokens of a 4,096-position model runs with 4,096 minus its prompt."""
    engine = Engine(parity_model(CKPT), parity_processor(CKPT), max_batch_size=1, prefill_chunk=64)
    assert engine.context == parity_model(CKPT).cfg.language.max_position_embeddings == 4096
    assert a4_tokens + 3000 > 4096
    engine.submit(a4_request("a4", 3000))
    assert engine.step() == []  # admitted, its tiles encoded, its first prompt chunk prefilled
    engine.cancel("a4")
    (done,) = engine.step()
    assert done.finish_reason == "cancelled" and done.n_prompt == a4_tokens
    assert (done.max_new_tokens, done.context) == (4096 - a4_tokens, 4096)


def test_cut_requests_stop_at_the_context_and_keep_their_tokens(tmp_path: Path) -> None:
    """Catches a budget cut that lets prompt plus answer pass the context (positions the model never learnt,
    a cache past its size) or that changes what is generated: in a batch on a 110-position model every answer
    stops at 110 positions or at its own budget, the cache never holds more than 110 slots, and a cut request
    generates what it generates asking for the cut budget itself of a 4,096-position model."""
    engine = small_engine(tmp_path, 110, max_batch_size=3)
    requests = [text_request("long", 20, 500), text_request("short", 10, 6), text_request("exact", 20, 110 - 88)]
    capacities, grow = [], engine._ensure_cache

    def spy(cache, rows):
        cache = grow(cache, rows)
        capacities.append(cache.capacity)
        return cache

    engine._ensure_cache = spy
    done = {c.id: c for c in engine.generate(requests)}
    assert done["exact"].n_prompt == 88 and capacities and max(capacities) <= 110, capacities
    for request in requests:
        c = done[request.id]
        assert c.finish_reason == "length" and c.context == 110, c
        assert c.max_new_tokens == c.n_generated == min(request.sampling.max_new_tokens, 110 - c.n_prompt), c
    assert [r.id for r in requests if done[r.id].cut_by_context] == ["long", "exact"]
    long = done["long"]
    assert long.n_prompt + long.n_generated == 110 and long.max_new_tokens < 500
    asked = Request("asked", requests[0].conversation, Sampling(max_new_tokens=long.max_new_tokens, suppress_eos=True))
    assert Engine(parity_model(CKPT), parity_processor(CKPT)).generate([asked])[0].token_ids == long.token_ids


def test_a_prompt_that_alone_does_not_fit_is_refused_at_submit_and_the_others_run(tmp_path: Path,
                                                                                  a4_tokens: int) -> None:
    """Catches a prompt past the context reaching the model (positions past what it learnt, a cache too small) or
    costing the requests beside it: `submit` raises PromptTooLong naming both counts with nothing queued, and the
    request already in flight runs on. A prompt one position short of the context still gets its one token;
    one that fills the context has no room for it."""
    engine = small_engine(tmp_path, 48, max_batch_size=2)
    ok = text_request("ok", 10, 4)  # 47 prompt tokens
    engine.submit(ok)
    with pytest.raises(PromptTooLong, match=rf"has {a4_tokens:,} tokens .* holds 48 positions") as caught:
        engine.submit(a4_request("a4", 5))
    assert (caught.value.n_prompt, caught.value.context) == (a4_tokens, 48)
    assert "\n" not in str(caught.value)
    done = []
    while engine.has_work:
        done += engine.step()
    assert [c.id for c in done] == ["ok"]
    again = engine.generate([ok])[0]
    assert (again.n_prompt, again.n_generated, again.max_new_tokens) == (47, 1, 1) and again.cut_by_context
    with pytest.raises(PromptTooLong, match=r"has 47 tokens .* holds 47 positions"):
        small_engine(tmp_path / "full", 47).generate([ok])


# -- records -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_generated", "context", "asked", "message"),
    [
        (64, 4096, 3000, "the answer reached the model's 4,096-position context after 4,032 prompt tokens and 64 "
                         "answer tokens (max_new_tokens 3,000) and was cut"),
        (64, 4096, 64, "the answer hit max_new_tokens (64) and was cut"),  # its own budget ends at the context too
        (50, 4096, 50, "the answer hit max_new_tokens (50) and was cut"),
        (50, None, 50, "the answer hit max_new_tokens (50) and was cut"),  # a runtime that does not say
    ],
)
def test_a_truncated_record_names_the_limit_it_hit(n_generated: int, context: int | None, asked: int,
                                                   message: str) -> None:
    """Catches a record that blames --max-new-tokens for a cut the context made (or the other way round)."""
    doc = Document("a.png", "a.png", "0" * 64, "image", 1)
    page = Page(doc, 1, Image.new("RGB", (8, 8)))
    ctx = RecordContext("ocr", Settings(model="m", max_new_tokens=asked))
    budget = min(asked, 4096 - 4032)
    completion = Completion("r0", (5,) * n_generated, "text", "length", 4032, n_generated,
                            max_new_tokens=budget if context else None, context=context)
    record = answered_record(ctx, page, "p", completion, OcrTask())
    assert (record.status, record.error) == ("truncated", message)


# -- end to end --------------------------------------------------------------------------------------------
def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def records(stdout: str) -> dict[str, dict]:
    return {Path(r["source"]).name: r for r in map(json.loads, stdout.splitlines()) if r}


def test_cli_cuts_an_a4_page_at_the_context(monkeypatch, tmp_path: Path, a4_tokens: int) -> None:
    """Catches a CLI run that passes the context or words the cut as the user's own limit: `dsvl2 ocr` of an A4
    page with --max-new-tokens 3000 on a model of a4_tokens + 24 positions stops there, status truncated, the
    reason naming the context and the prompt's tokens."""
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    make_image(Path("a4.png"), A4, "white")
    model = small_context_copy(tmp_path / "models", a4_tokens + 24)
    result = cli("ocr", "a4.png", "--prompt", PROMPT, "--model", str(model), "--max-new-tokens", "3000", "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    record = records(result.stdout)["a4.png"]
    assert record["tokens"] == {"prompt": a4_tokens, "generated": 24}, record["tokens"]
    assert record["status"] == "truncated" and record["settings"]["max_new_tokens"] == 3000
    assert record["error"] == (f"the answer reached the model's {a4_tokens + 24:,}-position context after "
                               f"{a4_tokens:,} prompt tokens and 24 answer tokens (max_new_tokens 3,000) and was cut")


def test_cli_fails_only_the_page_whose_prompt_does_not_fit(monkeypatch, tmp_path: Path, a4_tokens: int) -> None:
    """Catches a too-long prompt that fails the whole batch or the run: in one batch of three pages on a 1,000
    position model, the A4 page (more prompt than context) is `failed` with one line naming both counts, the
    pages before and after it are answered, and the run exits 1 (a failed page)."""
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    make_image(Path("in/1-small.png"), (64, 48), "navy")
    make_image(Path("in/2-a4.png"), A4, "white")
    make_image(Path("in/3-small.png"), (48, 64), "olive")
    model = small_context_copy(tmp_path / "models", 1000)
    result = cli("ocr", "in", "--prompt", PROMPT, "--model", str(model), "--max-new-tokens", "5", "-b", "3",
                 "-f", "jsonl")
    assert result.exit_code == 1, result.stderr
    got = records(result.stdout)
    assert sorted(got) == ["1-small.png", "2-a4.png", "3-small.png"]
    failed = got["2-a4.png"]
    assert failed["status"] == "failed" and failed["text"] is None
    assert f"{a4_tokens:,} tokens" in failed["error"] and "1,000 positions" in failed["error"], failed["error"]
    assert "\n" not in failed["error"]
    for name in ("1-small.png", "3-small.png"):
        assert got[name]["status"] != "failed", got[name]["error"]
        assert got[name]["tokens"]["generated"] >= 1
