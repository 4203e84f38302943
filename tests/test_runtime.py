"""The fused runtime (ONNX encoder + llama.cpp) against transformers' generate on the same checkpoint."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_af3 import AF3, AudioError, ContextOverflowError, GenerationOptions, OptionsError
from edge_af3.constants import EOS_TOKEN_ID
from edge_af3.errors import SessionBusyError
from edge_af3.prompt import Message, render

from .conftest import noise

QUESTION = "What do you hear?"
# greedy, with the checkpoint's repetition penalty (transformers applies it when greedy too)
GREEDY = GenerationOptions(temperature=0)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def model(bundle):
    # f32 KV and no flash attention: llama.cpp's exact path, for parity
    with AF3.load(bundle, exact=True, options=GREEDY) as m:
        yield m


def conversation(x, text=QUESTION):
    content = ([{"type": "audio", "audio": x}] if x is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def strip_eos(ids):
    return ids[: ids.index(EOS_TOKEN_ID)] if EOS_TOKEN_ID in ids else ids


def test_exact_mode_greedy_64_tokens_match_reference_one_after_another(model, reference):
    """Exact mode + the checkpoint's real generation config (repetition penalty 1.05, applied by
    transformers when greedy too): 64 greedy tokens equal transformers' for each clip, asked one
    after another on one loaded model (the KV prefix cache carries over between them)."""
    counts = {None: 0, 0.4: 10, 5.0: 125, 30.0: 750, 47.0: 1175, 650.0: 15000}
    assert model.generation["repetition_penalty"] == 1.05 and model.settings.exact
    for seconds, tokens in counts.items():
        x = None if seconds is None else noise(seconds, seed=int(seconds * 10))
        want = strip_eos(reference.generate(conversation(x), max_new_tokens=64))
        ans = model.ask(QUESTION, None if x is None else (x, 16000), max_new_tokens=64)
        assert list(ans.tokens) == want, seconds
        assert ans.timings.audio_tokens == tokens
        assert ans.finish_reason == ("length" if len(want) == 64 else "stop")


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
    model.ask(QUESTION, x, max_new_tokens=2)
    calls = model.encoder.calls
    model.ask("Again?", x, max_new_tokens=2)
    assert model.encoder.calls == calls


def test_interrupted_stream_leaves_model_usable(model):
    x = (noise(2.0, seed=31), 16000)
    expected = model.ask(QUESTION, x, max_new_tokens=20)
    chat = model.chat()
    stream = chat.stream(QUESTION, audio=x, max_new_tokens=20)
    pieces = [next(stream) for _ in range(3)]
    stream.close()  # the caller stops iterating
    assert pieces and chat.n_tokens == 0 and chat.messages == []
    again = chat.send(QUESTION, audio=x, max_new_tokens=20)
    assert again.tokens == expected.tokens


def test_two_threads_share_one_model(model):
    clips = [(noise(1.5, seed=s), 16000) for s in (41, 42)]
    sequential = [model.ask(QUESTION, c, max_new_tokens=12).tokens for c in clips]
    results = [None, None]

    def work(i):
        results[i] = model.ask(QUESTION, clips[i], max_new_tokens=12).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential


def test_prompt_too_long_names_the_context(bundle):
    with AF3.load(bundle, n_ctx=256) as small:
        with pytest.raises(ValueError, match=r"n_ctx is 256"):
            small.ask(QUESTION, (noise(30.0, seed=1), 16000), max_new_tokens=4)
        assert small.ask("Hi", None, max_new_tokens=2).tokens  # still usable


def test_sampling_options_are_checked_and_seeded(model):
    with pytest.raises(ValueError):
        model.ask("Hi", None, temperature=-1)
    a = model.ask("Hi", None, temperature=0.8, top_p=0.9, top_k=40, seed=7, max_new_tokens=8)
    b = model.ask("Hi", None, temperature=0.8, top_p=0.9, top_k=40, seed=7, max_new_tokens=8)
    assert a.tokens == b.tokens
    # ... and the options are used: a draw is not the greedy answer, another seed draws otherwise
    greedy = model.ask("Hi", None, temperature=0, max_new_tokens=8).tokens
    other = model.ask("Hi", None, temperature=0.8, top_p=0.9, top_k=40, seed=8, max_new_tokens=8).tokens
    assert a.tokens != greedy and other != a.tokens


def test_prefix_cache_reuses_system_prompt_and_clip(model, reference):
    """A second question about the same clip decodes only the question; a new clip still skips the
    system prompt; answers are the reference's either way."""
    x, y = noise(6.0, seed=51), noise(4.0, seed=52)
    model.forget()
    first = model.ask(QUESTION, (x, 16000), max_new_tokens=8)
    assert first.timings.reused_tokens == 0
    prefilled = model.llm.decoded_rows
    second = model.ask("Is it loud?", (x, 16000), max_new_tokens=8)
    assert list(second.tokens) == strip_eos(reference.generate(conversation(x, "Is it loud?"), max_new_tokens=8))
    head = len(model.llm.tokenize(render(model.template, [Message("user", "", n_audio=1)]).split("<sound>")[0]))
    assert second.timings.reused_tokens == head + 150  # system prompt + user header + the clip's 150 rows
    decoded = model.llm.decoded_rows - prefilled
    assert decoded < 30 + 8 + 8  # the question, the reply, the reply's close: never the clip again
    third = model.ask(QUESTION, (y, 16000), max_new_tokens=8)
    assert third.timings.reused_tokens == head
    assert list(third.tokens) == strip_eos(reference.generate(conversation(y), max_new_tokens=8))
    # the same prompt again: everything but its last token comes from the cache, same answer
    again = model.ask(QUESTION, (y, 16000), max_new_tokens=8)
    assert again.tokens == third.tokens and again.timings.reused_tokens == again.timings.prompt_tokens - 1
    # forget(): cold again
    model.forget()
    cold = model.ask(QUESTION, (y, 16000), max_new_tokens=8)
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
    with AF3.load(bundle, n_ctx=4096, exact=True, overlap=True, windows_per_run=2, options=GREEDY) as m:
        log = []
        m.encoder = _SlowEncoder(m.encoder, log)
        real = m.llm.seqs[0].decode_rows

        def logged(rows, **kw):
            log.append(("rows", rows.shape[0], time.perf_counter()))
            return real(rows, **kw)

        m.llm.seqs[0].decode_rows = logged
        ans = m.ask(QUESTION, (x, 16000), max_new_tokens=16)
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
            m.ask(QUESTION, (noise(3.0, seed=71), 16000), max_new_tokens=2)
        assert m.ask("Hello", None, max_new_tokens=2).tokens  # still usable


# -- generations as objects ----------------------------------------------------------------------
def test_paused_stream_does_not_block_another_thread(model):
    x = (noise(2.0, seed=81), 16000)
    solo = model.ask("Hello", max_new_tokens=8)
    paused = model.stream(QUESTION, x, max_new_tokens=20)
    first = next(paused)  # paused mid-answer, never resumed by this thread
    done = []
    t = threading.Thread(target=lambda: done.append(model.ask("Hello", max_new_tokens=8)))
    t.start()
    t.join(timeout=120)
    assert not t.is_alive() and done[0].tokens == solo.tokens
    rest = "".join(paused)  # the paused stream resumes where it was, with the same text as alone
    assert first + rest == model.ask(QUESTION, x, max_new_tokens=20).text
    assert paused.answer.timings.resyncs >= 1


def test_two_streams_read_in_turn_equal_their_solo_answers(model):
    a_args, b_args = ("Hi", None), ("Describe it.", (noise(1.0, seed=82), 16000))
    solo_a = model.ask(*a_args, max_new_tokens=16)
    solo_b = model.ask(*b_args, max_new_tokens=16)
    sa, sb = model.stream(*a_args, max_new_tokens=16), model.stream(*b_args, max_new_tokens=16)
    for _ in zip(sa, sb):
        pass
    sa.result(), sb.result()  # whichever was longer finishes alone
    assert sa.answer.tokens == solo_a.tokens and sb.answer.tokens == solo_b.tokens
    assert sa.answer.text == solo_a.text and sb.answer.text == solo_b.text


def test_cancel_then_a_new_question_on_the_same_session(model):
    chat = model.chat()
    with pytest.raises(SessionBusyError):
        s = chat.stream("Count to ten.", max_new_tokens=30)
        next(s)
        chat.stream("Another?")  # the first is still open
    s.cancel()
    assert s.answer.finish_reason == "cancelled" and list(s) == []
    assert chat.messages == [] and chat.n_tokens == 0  # a cancelled turn is not history
    ans = chat.ask("Count to ten.", max_new_tokens=10)
    assert ans.tokens == model.ask("Count to ten.", max_new_tokens=10).tokens
    # cancel() from another thread while the stream is being read: it stops within a token
    s = chat.stream("Tell me more.", max_new_tokens=400, ignore_eos=True)
    pieces = []
    for i, piece in enumerate(s):
        pieces.append(piece)
        if i == 2:
            threading.Thread(target=s.cancel).start()
    assert s.answer.finish_reason == "cancelled" and len(s.answer.tokens) < 400
    with model.stream("Hi", max_new_tokens=5) as s:
        next(s)
    assert s.answer.finish_reason == "cancelled"  # leaving the block cancels


def test_context_filling_mid_answer_keeps_the_text(bundle):
    with AF3.load(bundle, n_ctx=256, options=GREEDY) as small:
        s = small.stream("Hi", max_new_tokens=500, ignore_eos=True)
        text = "".join(s)
        ans = s.answer
        assert ans.finish_reason == "context" and ans.text == text and text
        assert ans.timings.prompt_tokens + len(ans.tokens) == 257  # every position used, the last token kept
        # a prompt that cannot fit is refused before anything is encoded, naming the n_ctx it needs
        calls = small.encoder.calls
        with pytest.raises(ContextOverflowError, match=r"n_ctx >= \d+"):
            small.stream(QUESTION, (noise(30.0, seed=1), 16000), max_new_tokens=100)
        assert small.encoder.calls == calls


def test_bad_audio_shapes_and_lengths_are_refused_clearly(model):
    x = noise(2.0, seed=83)
    stereo = model.ask(QUESTION, (np.stack([x, x]), 16000), max_new_tokens=4)  # channels first
    assert stereo.timings.audio_tokens == 50
    assert stereo.tokens == model.ask(QUESTION, (x, 16000), max_new_tokens=4).tokens
    with pytest.raises(AudioError, match="clip too short: 10 samples"):
        model.ask(QUESTION, (x[:10], 16000))
    with pytest.raises(AudioError, match="cannot tell samples from channels"):
        model.ask(QUESTION, (np.zeros((40, 40), np.float32), 16000))
    with pytest.raises(OptionsError, match="unknown generation option"):
        model.ask(QUESTION, temprature=0.5)


def test_close_closes_encoder_and_llm(bundle):
    m = AF3.load(bundle, n_ctx=512)
    enc = m.encoder
    m.close()
    assert enc.session is None and m.llm.ctx is None
    m.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        enc.encode(np.zeros((1, 128, 100), np.float32), np.ones((1, 100), np.int64))


def processed_logits(llm, sampler, logits: np.ndarray) -> np.ndarray:
    """What llama.cpp's non-final sampler chain makes of `logits` [vocab]: processed values for the
    candidates it keeps, -inf for the rest (the distribution a draw samples from, before softmax)."""
    import ctypes

    ll = llm._ll
    n = logits.shape[0]
    data = (ll.llama_token_data * n)()
    for i in range(n):
        data[i].id, data[i].logit, data[i].p = i, float(logits[i]), 0.0
    arr = ll.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    ll.llama_sampler_apply(sampler, ctypes.byref(arr))
    out = np.full(n, -np.inf, dtype=np.float64)
    for i in range(arr.size):
        out[arr.data[i].id] = arr.data[i].logit
    return out


def test_sampling_distribution_equals_transformers(model, reference):
    """The processed next-token distribution (penalty 1.05, temperature 0.7, top-k 20, top-p 0.8:
    the checkpoint's) of llama.cpp's chain equals transformers' at several steps of a sampled
    answer, fed the same raw logits and history."""
    import torch

    x = noise(3.0, seed=84)
    batch = reference.inputs(conversation(x))
    torch.manual_seed(0)
    with torch.inference_mode():
        out = reference.model.generate(
            **batch,
            max_new_tokens=6,
            do_sample=True,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt = batch["input_ids"][0].tolist()
    new = out.sequences[0, len(prompt) :].tolist()
    opts = GenerationOptions().resolved(model.generation)
    assert (opts.temperature, opts.top_k, opts.top_p, opts.repetition_penalty) == (0.7, 20, 0.8, 1.05)
    llm = model.llm
    for step in range(len(out.scores)):
        chain = llm.make_sampler(opts, final=False)
        try:
            llm.accept(chain, prompt + new[:step])
            ours = processed_logits(llm, chain, out.logits[step][0].double().numpy())
        finally:
            llm.free_sampler(chain)
        theirs = out.scores[step][0].double().numpy()
        assert np.array_equal(np.isfinite(ours), np.isfinite(theirs))  # the same candidates survive
        p, q = np.exp(ours - ours.max()), np.exp(theirs - theirs.max())
        assert np.abs(p / p.sum() - q / q.sum()).max() < 1e-5
