"""`--repetition-penalty` / `repetition_penalty=`: transformers' `RepetitionPenaltyLogitsProcessor` over the sequence
the reference hands it (the prompt's ids, `<image>` placeholders included, then the answer), on the tiny parity
checkpoints against a naive loop that runs the whole model over the whole sequence each step; batched rows with
mixed penalties equal each row alone; nothing is read back from the device; the option is checked once and
reaches the settings, the sampling and the retry through the CLI and the API. Each docstring names the bug
class its test catches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakes import invoke, jsonl, make_image
from parity import checkpoint_names, load_cases, parity_model, parity_processor, require
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import dsvl2
from dsvl2.model.engine import Engine
from dsvl2.model.processor import Prepared, Processor
from dsvl2.model.requests import Message, Request, Sampling
from dsvl2.model.sampling import SeenTokens
from dsvl2.model.vl2 import DeepseekVL2
from dsvl2.options import Options
from dsvl2.pipelines.base import OptionError, Settings
from dsvl2.pipelines.tasks import TASKS

CHECKPOINTS = require(checkpoint_names(), "parity checkpoints")


def conversation(case: str) -> tuple[Message, ...]:
    (found,) = [c for c in require(load_cases(), "parity cases") if c.name == case]
    return found.conversations()[0]


# -- the processor --------------------------------------------------------------------------------------------
def test_penalty_equals_transformers_processor_row_by_row() -> None:
    """Catches a penalty that differs from transformers' (the sign rule, ids seen several times penalised more
    than once, rows penalised with another row's ids or penalty, a penalty of 1 that moves a logit): every row
    equals the processor applied to that row alone, bit for bit."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g) * 3
    sequences = [[1, 5, 5, 7, 0], [3, 3, 3], [39, 0, 12], [2, 4, 6, 8], [10]]
    penalties = [1.3, 0.6, 1.3, 1.0, 2.5]
    rows = [4, 0, 2, 1, 3]  # cache row of each logits row
    seen = SeenTokens(6, 40, "cpu")
    for row, ids in zip(rows, sequences, strict=True):
        seen.start(row, ids[:2])  # the prompt
    for k in range(2, max(map(len, sequences))):  # then one token per row still going, as each decode step adds
        going = [(row, ids[k]) for row, ids in zip(rows, sequences, strict=True) if len(ids) > k]
        seen.add([row for row, _ in going], [token for _, token in going])
    got = seen.penalize(logits.clone(), rows, penalties)
    for n, (ids, penalty) in enumerate(zip(sequences, penalties, strict=True)):
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[n : n + 1].clone())[0]
        assert torch.equal(got[n], want), f"row {n}: worst at id {int((got[n] - want).abs().argmax())}"


@torch.inference_mode()
def test_penalty_reads_nothing_back_from_the_device() -> None:
    """Catches host synchronisations in the penalty (on a GPU each waits for the device's queue to drain, every
    step): starting rows, adding sampled tokens and penalising a batch run on the meta device, where reading any
    value back raises."""
    seen = SeenTokens(4, 50, "meta")
    seen.start(2, [0, 9, 9, 40])
    seen.add([2, 0], [7, 3])
    logits = seen.penalize(torch.zeros(3, 50, device="meta"), [2, 0, 1], [1.2, 1.0, 0.8])
    assert logits.shape == (3, 50) and logits.device.type == "meta"


# -- the engine against a naive loop ----------------------------------------------------------------------------
def prompt_embeds(model: DeepseekVL2, prepared: Prepared) -> torch.Tensor:
    images = prepared.images_spatial_crop.shape[0]
    crops = torch.zeros(1, max(images, 1), 2, dtype=torch.long)
    crops[0, :images] = prepared.images_spatial_crop
    return model.embed(prepared.input_ids[None], prepared.images_seq_mask[None], prepared.tiles, crops)


@torch.inference_mode()
def naive_greedy(model: DeepseekVL2, processor: Processor, request: Request, steps: int) -> tuple[list[int], int]:
    """Greedy tokens from the whole model over the whole sequence at every step (no cache), each step's logits
    through transformers' processor over what the reference's `generate(inputs_embeds=..., input_ids=...)` hands it:
    the prompt's ids, `<image>` placeholders included, then the tokens so far. Also how many steps would have
    picked another token had the processor seen only the answer, or the prompt without its image ids: steps
    that show the prompt's ids matter."""
    prepared = processor.prepare(request.conversation)
    prompt, image_id = prepared.input_ids.tolist(), processor.tokenizer.image_id
    penalty = RepetitionPenaltyLogitsProcessor(request.sampling.repetition_penalty)
    x, tokens, telling = prompt_embeds(model, prepared), [], 0
    for _ in range(steps):
        logits = model.language.logits(model.language(x))[:, -1]  # (1, V)
        token = int(penalty(torch.tensor([prompt + tokens]), logits.clone()).argmax())
        others = ([*tokens] or [image_id], [i for i in prompt if i != image_id] + tokens)
        telling += any(int(penalty(torch.tensor([ids]), logits.clone()).argmax()) != token for ids in others)
        tokens.append(token)
        x = torch.cat([x, model.language.embed(torch.tensor([[token]]))], dim=1)
    return tokens, telling


def assert_greedy_equals_naive(ckpt: str, request: Request) -> int:
    model, processor = parity_model(ckpt), parity_processor(ckpt)
    got = Engine(model, processor, max_batch_size=1).generate([request])[0]
    ids = list(got.token_ids) + ([processor.tokenizer.eos_id] if got.finish_reason == "eos" else [])
    want, telling = naive_greedy(model, processor, request, len(ids))
    assert ids == want, f"{ckpt} {request.id}: engine {ids} vs naive {want}"
    return telling


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
@pytest.mark.parametrize("penalty", [1.3, 0.5])
def test_greedy_text_with_penalty_equals_naive_loop(ckpt: str, penalty: float) -> None:
    """Catches a penalty applied to the wrong sequence, at the wrong time (after the first token, before the
    last one is counted) or to the wrong logits (cached decode, prefill's first token): 12 greedy tokens of a
    text prompt equal the naive loop's, on every checkpoint, penalties above and below 1."""
    request = Request("text", conversation("e_text_only"), Sampling(max_new_tokens=12, repetition_penalty=penalty))
    assert_greedy_equals_naive(ckpt, request)


def test_greedy_image_prompt_with_penalty_equals_naive_loop() -> None:
    """Catches a penalty that leaves out the prompt or its `<image>` placeholder ids (the reference counts them):
    with a penalty below 1, which favours ids already seen, the greedy tokens of an image prompt equal the naive
    loop's, and at some step the prompt's ids changed the token."""
    request = Request("image", conversation("f_tiny_image"), Sampling(max_new_tokens=8, repetition_penalty=0.5))
    assert assert_greedy_equals_naive(CHECKPOINTS[0], request) > 0, "no step tells the sequences apart"


def test_image_placeholder_ids_count_as_seen(monkeypatch) -> None:
    """Catches a sequence without the prompt's `<image>` ids (the reference's input_ids hold one per image token):
    with logits that rank an unseen id first and the image id second, a penalty of 0.5 (which lifts seen ids)
    puts the image id first for an image prompt only."""
    ckpt = CHECKPOINTS[0]
    model, processor = parity_model(ckpt), parity_processor(ckpt)
    image_id, unseen = processor.tokenizer.image_id, 7
    text, image = conversation("e_text_only"), conversation("f_tiny_image")
    assert unseen not in processor.prepare(text).input_ids and unseen not in processor.prepare(image).input_ids

    def ranked(hidden: torch.Tensor) -> torch.Tensor:
        out = torch.full((*hidden.shape[:-1], model.cfg.language.vocab_size), -3.0)
        out[..., unseen], out[..., image_id] = -1.0, -1.5  # penalised by 0.5 the image id's -1.5 becomes -0.75
        return out

    monkeypatch.setattr(model.language, "logits", ranked)
    engine = Engine(model, processor, max_batch_size=3)
    firsts = [c.token_ids[0] for c in engine.generate([
        Request("image", image, Sampling(max_new_tokens=1, repetition_penalty=0.5)),
        Request("text", text, Sampling(max_new_tokens=1, repetition_penalty=0.5)),
        Request("plain", image, Sampling(max_new_tokens=1)),
    ])]
    assert firsts == [image_id, unseen, unseen]


def test_penalty_changes_the_answer() -> None:
    """Catches a penalty that is accepted but never applied."""
    ckpt, conv = CHECKPOINTS[0], conversation("e_text_only")
    engine = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=2)
    plain = Request("plain", conv, Sampling(max_new_tokens=12))
    penalised = Request("penalised", conv, Sampling(max_new_tokens=12, repetition_penalty=0.5))
    plain, penalised = engine.generate([plain, penalised])
    assert plain.token_ids != penalised.token_ids


@pytest.mark.parametrize("ckpt", CHECKPOINTS[1:2])
def test_batched_rows_with_mixed_penalties_equal_each_alone(ckpt: str) -> None:
    """Catches a penalty that depends on the batch (another row's ids or penalty, a reused row's old ids, rows
    without a penalty touched): requests with and without penalties, greedy and sampled, admitted in waves into
    rows others left, give each the tokens it gives alone."""
    image, text = conversation("f_tiny_image"), conversation("e_text_only")
    requests = [
        Request("a", text, Sampling(max_new_tokens=10, repetition_penalty=0.5)),
        Request("b", image, Sampling(max_new_tokens=4)),
        Request("c", text, Sampling(max_new_tokens=6, repetition_penalty=1.3)),
        Request("d", image, Sampling(max_new_tokens=5, repetition_penalty=0.5)),
        Request("e", text, Sampling(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=3, repetition_penalty=1.2)),
        Request("f", text, Sampling(max_new_tokens=6)),
    ]
    model, processor = parity_model(ckpt), parity_processor(ckpt)
    batched = Engine(model, processor, max_batch_size=3, prefill_chunk=128).generate(requests)
    alone = Engine(model, processor, max_batch_size=1)
    for request, got in zip(requests, batched, strict=True):
        want = alone.generate([request])[0]
        assert got.token_ids == want.token_ids, f"{ckpt} {request.id}: batched {got.token_ids}, alone {want.token_ids}"


# -- options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1.1, float("nan")])
def test_a_penalty_that_is_not_positive_is_refused_by_name(value: float) -> None:
    """Catches a bad penalty reaching the model (0 divides by zero, a negative one flips every seen logit)."""
    with pytest.raises(OptionError) as caught:
        Options.create(repetition_penalty=value)
    assert (caught.value.flag, caught.value.problem) == ("--repetition-penalty", "must be > 0")


def test_the_penalty_reaches_settings_sampling_and_the_retry() -> None:
    """Catches a penalty dropped on the way from the options to the requests, or by the retry of a loop."""
    settings = Options.create(repetition_penalty=1.1).settings(TASKS["ocr"])
    assert settings.to_dict()["repetition_penalty"] == 1.1
    assert settings.sampling().repetition_penalty == settings.retry_sampling().repetition_penalty == 1.1
    assert Settings(model="m").sampling().repetition_penalty == 1.0  # off by default


def test_api_penalty_reaches_the_records_and_every_attempt(fake) -> None:
    """Catches `repetition_penalty=` not reaching the runtime through the API, or lost by --retry-repetition."""
    make_image(Path("p.png"))
    fake.enqueue("la la la", finish_reason="repetition").enqueue("fine")
    [record] = list(dsvl2.ocr("p.png", repetition_penalty=1.1, retry_repetition=True))
    assert record["settings"]["repetition_penalty"] == 1.1 and len(record["attempts"]) == 2
    assert [r.sampling.repetition_penalty for r in fake.requests] == [1.1, 1.1]
    with pytest.raises(OptionError, match="repetition_penalty must be > 0"):
        list(dsvl2.ocr("p.png", repetition_penalty=0))


def test_cli_penalty_reaches_the_records_and_is_checked(fake) -> None:
    """Catches `--repetition-penalty` missing from a command or not reaching the runtime and the record."""
    make_image(Path("p.png"))
    result = invoke("ocr", "p.png", "--repetition-penalty", "1.1", "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    [record] = jsonl(result.stdout)
    assert record["settings"]["repetition_penalty"] == 1.1 and fake.requests[0].sampling.repetition_penalty == 1.1
    result = invoke("ocr", "p.png", "--repetition-penalty", "0")
    assert result.exit_code == 2 and result.stderr.strip() == "error: usage: --repetition-penalty must be > 0"
