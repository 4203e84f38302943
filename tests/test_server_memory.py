"""`serve --memory --memory-input`: the server hears a recording and answers `POST /v1/memory/ask`
over real HTTP as transformers answers about the remembered audio; its slots keep serving; bad
requests get OpenAI-shaped errors."""

from __future__ import annotations

import time

import pytest
import soundfile as sf

from edge_af3.constants import EOS_TOKEN_ID, SOUND_TOKEN_ID

from .conftest import noise
from .test_server import Server

QUESTION = "What do you hear?"


def reference_text(reference, x, n=16):
    conv = [{"role": "user", "content": [{"type": "audio", "audio": x}, {"type": "text", "text": QUESTION}]}]
    ids = reference.generate(conv, max_new_tokens=n)
    ids = ids[: ids.index(EOS_TOKEN_ID)] if EOS_TOKEN_ID in ids else ids
    prompt = reference.inputs(conv)["input_ids"][0].tolist()
    return reference.processor.tokenizer.decode(ids), len(prompt) - 1 - max(
        i for i, t in enumerate(prompt) if t == SOUND_TOKEN_ID
    )


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served-memory")
    x = noise(95, seed=95)
    sf.write(tmp / "95s.wav", x, 16000, subtype="FLOAT")
    args = ["--memory", "2m", "--memory-input", str(tmp / "95s.wav"), "--memory-fast", "--memory-dir", str(tmp / "m")]
    server = Server(tiny_bundle, *args, "--exact", tmp_path=tmp)
    deadline = time.monotonic() + 120
    while server.get("/v1/memory").json()["status"] != "ended":  # the recording was heard to its end
        assert time.monotonic() < deadline, server.tail()
        time.sleep(0.2)
    yield server, x
    server.stop()


def test_memory_ask_answers_as_the_reference_at_text_cost(served, reference):
    server, x = served
    status = server.get("/v1/memory").json()
    assert status["remembered"] == [[0.0, 95.0]] and status["windows"] == 3
    r = server.post("/v1/memory/ask", json={"question": QUESTION, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    text, question_tokens = reference_text(reference, x)
    assert body["answer"] == text
    assert body["usage"]["prefilled_tokens"] == question_tokens
    assert body["span"][0] == [0.0, 30.0] and body["span"][-1] == [90.0, 95.0]
    # a stretch from the archive, prefilled on a sequence of its own: the slots and the memory keep theirs
    r = server.post("/v1/memory/ask", json={"question": QUESTION, "at": [0, 30], "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200 and r.json()["answer"] == reference_text(reference, x[: 30 * 16000])[0]
    chat = server.client().chat.completions.create(
        model="edge-af3", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert chat.choices[0].message.content is not None
    again = server.post("/v1/memory/ask", json={"question": QUESTION, "max_tokens": 16, "temperature": 0}).json()
    assert again["answer"] == text and again["usage"]["prefilled_tokens"] <= question_tokens


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({}, 400, "question"),
        ({"question": "   "}, 400, "question"),
        ({"question": "q", "at": [30, 10]}, 400, "at"),
        ({"question": "q", "at": "0-30"}, 400, "at"),
        ({"question": "q", "at": [500, 560]}, 400, None),  # nothing heard then
        ({"question": "q", "max_tokens": -1}, 400, "max_tokens"),
        ({"question": "<sound> q"}, 400, None),
    ],
)
def test_bad_memory_requests_are_refused_and_the_server_goes_on(served, body, status, param):
    server, _ = served
    r = server.post("/v1/memory/ask", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert server.post("/v1/memory/ask", content=b"{not json").status_code == 400
    assert server.get("/health").status_code == 200


def test_a_server_without_memory_says_so(tiny_bundle, tmp_path):
    server = Server(tiny_bundle, tmp_path=tmp_path)
    try:
        r = server.post("/v1/memory/ask", json={"question": "q"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_memory"
    finally:
        server.stop()
