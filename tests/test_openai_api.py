"""The OpenAI request dialect of `dsvl2 serve`, without a server: bodies → conversation and sampling, every
refusal with its status and the field it names, and the `--server` client's bodies read back identically."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from dsvl2.model.requests import ASSISTANT, USER, Completion, Message, Request, Sampling, user_prompt
from dsvl2.openai_api import APIError, Limits, chunk_body, completion_body, parse_chat
from dsvl2.remote import chat_messages, request_body

MODEL = "tiny"


def png(size=(32, 24), color=(10, 200, 30), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png()}}, {"type": "text", "text": "Read it."}]}], **kw}


def refused(b, limits: Limits | None = None, **kw) -> APIError:
    with pytest.raises(APIError) as info:
        parse_chat(b, model=MODEL, limits=limits or Limits(), **kw)
    return info.value


def test_image_then_text_is_the_local_prompt():
    call = parse_chat(body(max_tokens=7, temperature=0, seed=3, stop="##"), model=MODEL, limits=Limits())
    local = user_prompt("Read it.", (Image.new("RGB", (32, 24)),))
    assert [(m.role, m.content, len(m.images)) for m in call.conversation] == [
        (m.role, m.content, len(m.images)) for m in local]
    assert call.conversation[0].images[0].getpixel((0, 0)) == (10, 200, 30)
    assert (call.max_tokens, call.sampling.temperature, call.sampling.seed, call.sampling.stop) == (7, 0.0, 3, ("##",))
    assert not call.stream


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_formats(fmt):
    b = body()
    b["messages"][0]["content"][0]["image_url"]["url"] = png(fmt=fmt)
    assert parse_chat(b, model=MODEL, limits=Limits()).conversation[0].images[0].size == (32, 24)


def test_client_bodies_read_back_as_the_same_request():
    """What `--server` sends is what the server runs: same turns, same placeholders, same sampling."""
    image = Image.new("RGB", (40, 30), (1, 2, 3))
    conversation = (Message(USER, "<image>\nFirst?", (image,)), Message(ASSISTANT, "yes"),
                    Message(USER, "And <image>\nthis one?", (image,)), Message(ASSISTANT, ""))
    sampling = Sampling(max_new_tokens=11, temperature=0.3, top_p=0.9, seed=5, stop=("x",), no_repeat_ngram=12,
                        repeat_window=64, repetition_penalty=1.1)
    sent = request_body(Request("r", conversation, sampling), MODEL)
    wire = {k: v for k, v in sent.items() if k != "extra_body"} | sent["extra_body"]
    call = parse_chat(wire, model=MODEL, limits=Limits())
    assert [(m.role, m.content) for m in call.conversation] == [(m.role, m.content) for m in conversation]
    assert call.conversation[2].images[0].tobytes() == image.tobytes()  # PNG: lossless
    assert call.sampling == Sampling(max_new_tokens=11, temperature=0.3, top_p=0.9, seed=5, stop=("x",),
                                     no_repeat_ngram=12, repeat_window=64, repetition_penalty=1.1)
    assert chat_messages(conversation)[1] == {"role": "assistant", "content": "yes"}


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        (lambda b: b.update(model="other"), 404, "model"),
        (lambda b: b.update(messages=[]), 400, "messages"),
        (lambda b: b.update(messages=[{"role": "system", "content": "x"}]), 400, "messages[0].role"),
        (lambda b: b["messages"].append({"role": "assistant", "content": "x"}), 400, "messages[1].role"),
        (lambda b: b.update(temperature="hot"), 400, "temperature"),
        (lambda b: b.update(temperature=3), 400, "temperature"),
        (lambda b: b.update(top_p=0), 400, "top_p"),
        (lambda b: b.update(max_tokens=0), 400, "max_tokens"),
        (lambda b: b.update(n=2), 400, "n"),
        (lambda b: b.update(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (lambda b: b.update(stream="yes"), 400, "stream"),
        (lambda b: b.update(repetition_penalty=0), 400, "repetition_penalty"),
        (lambda b: b["messages"][0]["content"].append({"type": "text", "text": "<image>"}), 400,
         "messages[0].content[2]"),
        (lambda b: b["messages"][0]["content"].append({"type": "audio"}), 400, "messages[0].content[2]"),
    ],
)
def test_bad_fields_are_named(change, status, param):
    b = body()
    change(b)
    error = refused(b)
    assert (error.status, error.param) == (status, param), error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_bad_images():
    def with_url(url):
        b = body()
        b["messages"][0]["content"][0]["image_url"]["url"] = url
        return b

    assert refused(with_url("data:image/png;base64,@@@not-base64")).code == "invalid_image"
    assert refused(with_url("data:image/png;base64," + base64.b64encode(b"not a png").decode())).code == \
        "invalid_image"
    assert "PNG, JPEG or WebP" in refused(with_url("data:image/gif;base64,R0lGOD==")).message
    assert refused(with_url(png((400, 400))), Limits(max_image_bytes=100)).status == 413
    assert refused(with_url(png((400, 400))), Limits(max_image_pixels=1000)).status == 413
    assert "--allow-remote-images" in refused(with_url("https://example.com/a.png")).message
    fetched = parse_chat(with_url("https://example.com/a.png"), model=MODEL,
                         limits=Limits(allow_remote_images=True),
                         fetch=lambda url: base64.b64decode(png().split(",")[1]))
    assert fetched.conversation[0].images[0].size == (32, 24)
    many = body()
    many["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": png()}}] * 3
    assert refused(many, Limits(max_images=2)).code == "too_many_images"


def test_response_shapes():
    done = Completion("r", (1, 2), "hello", "repetition", n_prompt=9, n_generated=2)
    answer = completion_body(done, call_id="c", model=MODEL)
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert answer["choices"][0]["finish_reason"] == "repetition"
    assert answer["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    closing = chunk_body(call_id="c", model=MODEL, created=1, finish_reason="eos")
    assert closing["choices"][0]["finish_reason"] == "stop"
    assert chunk_body(call_id="c", model=MODEL, created=1, usage_of=done)["choices"] == []
