"""`dsvl2 serve` as a real subprocess on loopback with the tiny parity checkpoint, talked to by the official
`openai` client and by raw HTTP: answers equal the in-process engine's (greedy), streaming equals the whole
answer, concurrent clients are batched by one engine, bad requests get their 4xx and the server goes on,
a client that leaves is cancelled, and `--api-key` is enforced."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from parity import checkpoint_dir, load_image
from servers import Server

from dsvl2.model.requests import Request, Sampling, user_prompt

CHECKPOINT = checkpoint_dir("tiny-mha")
IMAGES = ["doc_landscape_800x600.png", "receipt_narrow_180x420.png", "chart_strip_500x200.png", "tiny_50x40.png"]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server(CHECKPOINT, "--max-images", "3", "--max-body-mb", "4", "--max-image-mb", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local():
    """The same checkpoint in this process: what every answer must equal."""
    import dsvl2

    return dsvl2.load(str(CHECKPOINT), batch_size=1)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def data_url(name: str) -> str:
    buffer = io.BytesIO()
    load_image(name).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(name: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(name)}},
                                         {"type": "text", "text": text}]}]


def local_answer(local, name: str, text: str, max_tokens: int) -> str:
    request = Request("x", user_prompt(text, (load_image(name),)), Sampling(max_new_tokens=max_tokens))
    return local.generate([request])[0].text


def model_name(client) -> str:
    return next(iter(client.models.list())).id


def test_answers_equal_the_local_engine(server, client, local):
    name = model_name(client)
    reply = client.chat.completions.create(model=name, messages=messages(IMAGES[0], "Describe the page."),
                                           max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == local_answer(local, IMAGES[0], "Describe the page.", 12)
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 100
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_gives_the_same_text(server, client):
    name = model_name(client)
    whole = client.chat.completions.create(model=name, messages=messages(IMAGES[1], "Read it."), max_tokens=16,
                                           temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(model=name, messages=messages(IMAGES[1], "Read it."),
                                                 max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_concurrent_clients_share_one_engine(server, client, local):
    name = model_name(client)
    jobs = [(IMAGES[1 + k % 3], f"Question {k}?", 4 + k) for k in range(8)]  # the small images: quick
    answers: dict[int, str] = {}

    def ask(k: int) -> None:
        image, text, budget = jobs[k]
        answers[k] = client.chat.completions.create(model=name, messages=messages(image, text), max_tokens=budget,
                                                    temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for k, (image, text, budget) in enumerate(jobs):
        assert answers[k] == local_answer(local, image, text, budget), f"client {k}"
    engine = server.get("/health")[1]["engine"]
    assert engine["max_running"] >= 2, f"the engine never ran two requests together: {engine}"


def good(max_tokens: int = 4) -> dict:
    return {"model": None, "messages": messages(IMAGES[3], "Hi?"), "max_tokens": max_tokens, "temperature": 0}


def test_bad_requests_get_4xx_and_the_server_goes_on(server, client):
    name = model_name(client)
    ok = {**good(), "model": name}
    huge = base64.b64encode(os.urandom(3 * 2**19)).decode()  # 1.5 MiB: over the image limit, not the body's
    def image(url: str, n: int = 1) -> dict:
        return {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * n}]}

    cases = [
        (b"{not json", 400),
        (image("data:image/png;base64,%%%"), 400),
        (image("data:image/png;base64," + base64.b64encode(b"junk").decode()), 400),
        (image("data:image/png;base64," + huge), 413),
        (image(data_url(IMAGES[3]), 4), 400),
        ({**ok, "max_tokens": 10**6}, 400),
        ({**ok, "model": "not-served"}, 404),
        (json.dumps({**ok, "padding": "x" * (5 * 2**20)}).encode(), 413),
        ({**ok, "n": 3}, 400),
        (image("https://example.com/x.png"), 400),
    ]
    for k, (payload, status) in enumerate(cases):
        code, answer = server.post(payload)
        assert code == status, f"case {k}: {code} {answer}"
        assert set(answer["error"]) >= {"message", "type", "code"}, f"case {k}: {answer}"
        assert server.post(ok)[0] == 200, f"after case {k} the server no longer answers"
    code, answer = server.post({**ok, "max_tokens": 10**6})
    assert answer["error"]["code"] == "context_length_exceeded"


def test_a_client_that_leaves_is_cancelled(server, client):
    name = model_name(client)
    before = server.get("/health")[1]["engine"]["cancelled"]
    stream = client.chat.completions.create(model=name, messages=messages(IMAGES[0], "Go on."), max_tokens=2000,
                                            temperature=0.7, stream=True, extra_body={"seed": 1})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.get("/health")[1]["engine"]["cancelled"] == before:
        time.sleep(0.2)
    engine = server.get("/health")[1]["engine"]
    assert engine["cancelled"] == before + 1 and engine["running"] <= 1, engine


def test_api_key_is_required_when_set(tmp_path: Path):
    s = Server(CHECKPOINT, env={"DSVL2_API_KEY": "s3cret"})
    try:
        assert s.get("/health")[0] == 200  # the probe stays open
        code, answer = s.request("GET", "/v1/models")
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
        assert s.post(good(), Authorization="Bearer wrong")[0] == 401
        models = s.request("GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[1]
        body = {**good(), "model": models["data"][0]["id"]}
        assert s.post(body, Authorization="Bearer s3cret")[0] == 200
    finally:
        s.stop()


def test_sigterm_finishes_what_is_in_flight_then_exits():
    s = Server(CHECKPOINT, "--shutdown-timeout", "60")
    try:
        name = s.request("GET", "/v1/models")[1]["data"][0]["id"]
        body = {**good(max_tokens=120), "model": name, "temperature": 0.7, "seed": 3}
        answers: list[tuple[int, dict]] = []
        asking = threading.Thread(target=lambda: answers.append(s.post(body)))
        asking.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and s.get("/health")[1]["engine"]["running"] == 0:
            time.sleep(0.05)
        s.proc.terminate()  # SIGTERM while the answer is being generated
        asking.join(120)
        assert s.proc.wait(60) == 0
        [(code, answer)] = answers
        assert code == 200 and answer["usage"]["completion_tokens"] > 0, answer
    finally:
        s.stop()
