"""The fused runtime (ONNX encoder + llama.cpp) against transformers' generate on the same checkpoint."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_af3 import AF3
from edge_af3.constants import EOS_TOKEN_ID
from edge_af3.prompt import Message, render

from .conftest import noise

QUESTION = "What do you hear?"


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def model(bundle):
    # f32 KV and no flash attention: llama.cpp's exact path, for parity
    with AF3.load(bundle, n_ctx=15400, kv_type="f32", flash_attn=False) as m:
        yield m


def conversation(x, text=QUESTION):
    content = ([{"type": "audio", "audio": x}] if x is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def strip_eos(ids):
    return ids[: ids.index(EOS_TOKEN_ID)] if EOS_TOKEN_ID in ids else ids


@pytest.mark.parametrize("seconds", [None, 0.5, 10.0, 45.0, 650.0])
def test_greedy_32_tokens_match_reference(model, reference, seconds):
    x = None if seconds is None else noise(seconds, seed=int((seconds or 0) * 10))
    want = strip_eos(reference.generate(conversation(x), max_new_tokens=32))
    ans = model.ask(None if x is None else (x, 16000), QUESTION, max_new_tokens=32)
    assert list(ans.tokens) == want
    assert ans.timings.audio_tokens == {None: 0, 0.5: 12, 10.0: 250, 45.0: 1125, 650.0: 15000}[seconds]


def test_prefill_logits_match_reference(model, reference):
    x = noise(3.0, seed=5)
    want = reference.logits(conversation(x))[-1]
    got = model.chat().logits(QUESTION, audio=(x, 16000))
    assert np.abs(got - want).max() <= 1e-3


def test_template_renders_like_transformers(reference, model):
    x = np.zeros(16000, np.float32)
    ids = reference.inputs(conversation(x))["input_ids"][0].tolist()
    ref_text = reference.processor.tokenizer.decode([i for i in ids if i != 151669][:6]) + ""
    ours = render(model.template, [Message("user", QUESTION, n_audio=1)])
    assert ours.replace("<sound>", "").startswith(ref_text)
    assert ours.count("<sound>") == 1 and ours.endswith("<|im_start|>assistant\n")


def test_multi_turn_reuses_kv_and_matches_reference(model, reference):
    x = noise(8.0, seed=11)
    chat = model.chat()
    first = chat.send(QUESTION, audio=(x, 16000), max_new_tokens=12)
    enc_calls, prefilled, decoded = model.encoder.calls, chat.prefilled_tokens, model.llm.decoded_rows
    second = chat.send("Tell me more.", max_new_tokens=16)
    conv = conversation(x) + [
        {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
        {"role": "user", "content": [{"type": "text", "text": "Tell me more."}]},
    ]
    assert list(second.tokens) == strip_eos(reference.generate(conv, max_new_tokens=16))
    assert model.encoder.calls == enc_calls  # no re-encoding
    new_prompt = chat.prefilled_tokens - prefilled
    full_prompt = reference.inputs(conv)["input_ids"].shape[1]
    assert 0 < new_prompt < 40 < full_prompt  # only the new turn was prefilled (plus the reply's close)
    assert model.llm.decoded_rows - decoded < full_prompt


def test_audio_in_a_later_turn_and_two_clips(model):
    chat = model.chat(system="You are terse.")
    chat.send("Hello.", max_new_tokens=4)
    ans = chat.send("Compare these.", audio=[(noise(1.0, 1), 16000), (noise(2.0, 2), 16000)], max_new_tokens=4)
    assert ans.timings.audio_tokens == 25 + 50
    assert chat.rendered.count("<sound>") == 2 and len(chat.audio) == 2


def test_embedding_cache_skips_the_encoder(model):
    x = (noise(4.0, seed=21), 16000)
    model.ask(x, QUESTION, max_new_tokens=2)
    calls = model.encoder.calls
    model.ask(x, "Again?", max_new_tokens=2)
    assert model.encoder.calls == calls


def test_interrupted_stream_leaves_model_usable(model):
    x = (noise(2.0, seed=31), 16000)
    expected = model.ask(x, QUESTION, max_new_tokens=20)
    chat = model.chat()
    stream = chat.stream(QUESTION, audio=x, max_new_tokens=20)
    pieces = [next(stream) for _ in range(3)]
    stream.close()  # the caller stops iterating
    assert pieces and chat.n_tokens == 0 and chat.messages == []
    again = chat.send(QUESTION, audio=x, max_new_tokens=20)
    assert again.tokens == expected.tokens


def test_two_threads_share_one_model(model):
    clips = [(noise(1.5, seed=s), 16000) for s in (41, 42)]
    sequential = [model.ask(c, QUESTION, max_new_tokens=12).tokens for c in clips]
    results = [None, None]

    def work(i):
        results[i] = model.ask(clips[i], QUESTION, max_new_tokens=12).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential


def test_prompt_too_long_names_the_context(bundle):
    with AF3.load(bundle, n_ctx=256) as small:
        with pytest.raises(ValueError, match=r"n_ctx is 256"):
            small.ask((noise(30.0, seed=1), 16000), QUESTION, max_new_tokens=4)
        assert small.ask(None, "Hi", max_new_tokens=2).tokens  # still usable


def test_sampling_options_are_checked_and_seeded(model):
    with pytest.raises(ValueError):
        model.ask(None, "Hi", temperature=-1)
    a = model.ask(None, "Hi", temperature=0.8, top_p=0.9, top_k=40, seed=7, max_new_tokens=8)
    b = model.ask(None, "Hi", temperature=0.8, top_p=0.9, top_k=40, seed=7, max_new_tokens=8)
    assert a.tokens == b.tokens


def test_prefix_cache_reuses_system_prompt_and_clip(model, reference):
    """A second question about the same clip decodes only the question; a new clip still skips the
    system prompt; answers are the reference's either way."""
    x, y = noise(6.0, seed=51), noise(4.0, seed=52)
    model.forget()
    first = model.ask((x, 16000), QUESTION, max_new_tokens=8)
    assert first.timings.reused_tokens == 0
    prefilled = model.llm.decoded_rows
    second = model.ask((x, 16000), "Is it loud?", max_new_tokens=8)
    assert list(second.tokens) == strip_eos(reference.generate(conversation(x, "Is it loud?"), max_new_tokens=8))
    head = len(model.llm.tokenize(render(model.template, [Message("user", "", n_audio=1)]).split("<sound>")[0]))
    assert second.timings.reused_tokens == head + 150  # system prompt + user header + the clip's 150 rows
    decoded = model.llm.decoded_rows - prefilled
    assert decoded < 30 + 8 + 8  # the question, the reply, the reply's close: never the clip again
    third = model.ask((y, 16000), QUESTION, max_new_tokens=8)
    assert third.timings.reused_tokens == head
    assert list(third.tokens) == strip_eos(reference.generate(conversation(y), max_new_tokens=8))
    # the same prompt again: everything but its last token comes from the cache, same answer
    again = model.ask((y, 16000), QUESTION, max_new_tokens=8)
    assert again.tokens == third.tokens and again.timings.reused_tokens == again.timings.prompt_tokens - 1
    # forget(): cold again
    model.forget()
    cold = model.ask((y, 16000), QUESTION, max_new_tokens=8)
    assert cold.tokens == third.tokens and cold.timings.reused_tokens == 0


class _SlowEncoder:
    """The real encoder, 0.15 s slower per run, logging when each run ends."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log
        self.name, self.dynamic_frames = inner.name, inner.dynamic_frames

    def encode(self, features, mask):
        import time

        time.sleep(0.15)
        out = self.inner.encode(features, mask)
        self.log.append(("encode", features.shape[0], time.perf_counter()))
        return out


def test_overlapped_encoder_feeds_prefill_window_by_window(bundle, reference):
    """overlap=True (the GPU default): the clip is encoded on a thread while llama.cpp takes the
    text before it and each finished chunk of windows; the answer is the reference's."""
    import time

    x = noise(100.0, seed=61)  # 3 full windows + 10 s: chunks of 2 full windows, 1 full, the partial one
    want = strip_eos(reference.generate(conversation(x), max_new_tokens=16))
    with AF3.load(bundle, n_ctx=4096, kv_type="f32", flash_attn=False, overlap=True, windows_per_run=2) as m:
        log = []
        m.encoder = _SlowEncoder(m.encoder, log)
        real = m.llm.decode_embeddings

        def logged(rows, **kw):
            log.append(("rows", rows.shape[0], time.perf_counter()))
            return real(rows, **kw)

        m.llm.decode_embeddings = logged
        ans = m.ask((x, 16000), QUESTION, max_new_tokens=16)
        assert list(ans.tokens) == want and ans.timings.audio_tokens == 2500
        assert [n for k, n, _ in log if k == "encode"] == [2, 1, 1]
        assert [n for k, n, _ in log if k == "rows"] == [1500, 750, 250]  # each chunk as it came
        first_rows = next(t for k, _, t in log if k == "rows")
        last_encode = max(t for k, _, t in log if k == "encode")
        assert first_rows < last_encode  # the first chunk was in llama.cpp before the encoder finished
        # a follow-up turn in the same chat re-uses the clip (rows kept by the thread)
        chat = m.chat()
        chat.send(QUESTION, audio=(x, 16000), max_new_tokens=4)
        assert len(chat.audio) == 1 and chat.audio[0].shape == (2500, 64)
        m.forget()  # the history is replayed from the session's own rows
        assert chat.send("More?", max_new_tokens=4).timings.reused_tokens == 0


def test_overlapped_encoder_error_reaches_the_caller(bundle):
    with AF3.load(bundle, n_ctx=4096, overlap=True) as m:

        class Broken:
            name, dynamic_frames = "broken", True

            def encode(self, features, mask):
                raise RuntimeError("encoder exploded")

        m.encoder = Broken()
        with pytest.raises(RuntimeError, match="encoder exploded"):
            m.ask((noise(3.0, seed=71), 16000), QUESTION, max_new_tokens=2)
        assert m.ask(None, "Hello", max_new_tokens=2).tokens  # still usable
