"""The audio memory (runtime/memory.py) against transformers: audio fed as a microphone would
feed it, questions answered from the KV cache, compared with the reference given the remembered
audio as one clip with the same question."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edge_af3 import AF3, ContextOverflowError, GenerationOptions, OptionsError
from edge_af3.constants import EOS_TOKEN_ID, SOUND_TOKEN_ID
from edge_af3.errors import SessionBusyError

from .conftest import noise

QUESTION = "What do you hear?"
RATE = 16000


@pytest.fixture(scope="module")
def model(tiny_bundle):
    # exact mode (f32 KV, no flash attention): greedy tokens equal transformers'; 3 sequences:
    # the shared one (questions about a time range) and two for an exact memory
    with AF3.load(tiny_bundle, exact=True, options=GenerationOptions(temperature=0), n_seq=3, n_ctx=8192) as m:
        yield m


def conversation(x, text=QUESTION):
    return [{"role": "user", "content": [{"type": "audio", "audio": x}, {"type": "text", "text": text}]}]


def want(reference, x, n=24):
    ids = reference.generate(conversation(x), max_new_tokens=n)
    return ids[: ids.index(EOS_TOKEN_ID)] if EOS_TOKEN_ID in ids else ids


def feed(mem, x, block=0.5):
    """As a microphone hands it over: blocks of `block` seconds."""
    step = int(block * RATE)
    for i in range(0, x.size, step):
        mem.feed(x[i : i + step])


def test_95_s_through_the_memory_answers_as_the_reference_at_text_cost(model, reference):
    """4 windows (30+30+30+5 s) encoded and prefilled as they are heard, the tail re-encoded every
    10 s: the greedy answer equals transformers' for the 95 s as one clip, and the question
    decodes only its own tokens (counted in the reference's own input ids)."""
    x = noise(95, seed=95)
    with model.memory(120, max_new_tokens=24) as mem:
        feed(mem, x)
        mem.flush()
        assert [(w.index, w.seconds) for w in mem.held] == [(0, 30), (1, 30), (2, 30), (3, 5)]
        assert mem.stats.windows == 3 and mem.stats.tails >= 3 and mem.span() == [(0.0, 95.0)]
        ans = mem.ask(QUESTION, max_new_tokens=24)
    assert list(ans.tokens) == want(reference, x)
    ids = reference.inputs(conversation(x))["input_ids"][0].tolist()
    after_audio = len(ids) - (max(i for i, t in enumerate(ids) if t == SOUND_TOKEN_ID) + 1)
    assert ans.timings.prompt_tokens == len(ids)
    assert ans.timings.prompt_tokens - ans.timings.reused_tokens == after_audio  # the question's tokens only
    assert ans.timings.audio_tokens == ids.count(SOUND_TOKEN_ID) == 3 * 750 + 125


def test_after_evictions_exact_mode_equals_the_reference_on_what_is_left(model, reference):
    """A 60 s memory (2 full windows and the tail) fed 125 s evicts two windows. Shifted in
    place, its KV is an approximation (the question still costs only its tokens); exact mode
    re-prefills the rest on its spare sequence and then answers as transformers does for the
    remembered 60-125 s."""
    x = noise(125, seed=125)
    for exact in (False, True):
        with model.memory(60, max_new_tokens=24, exact=exact) as mem:
            feed(mem, x, block=2.0)
            mem.flush()
            assert mem.wait_exact(timeout=120)
            assert mem.span() == [(60.0, 125.0)] and mem.stats.evicted == 2
            ans = mem.ask(QUESTION, max_new_tokens=24)
            assert (mem.stats.rebuilds >= 1) == exact
        assert ans.timings.prompt_tokens - ans.timings.reused_tokens < 20
        if exact:
            assert list(ans.tokens) == want(reference, x[60 * RATE :])


def test_questions_while_windows_arrive_on_another_thread(model, reference):
    """The listen loop's threads on a real exact memory: one thread feeds 125 s in 0.25 s blocks
    (tails every 10 s, evictions, rebuilds on the spare sequence when an eviction shifted the
    KV) while this one keeps asking.
    Nothing deadlocks, every answer ends, and once all is in, the answer is transformers' for
    the remembered 60-125 s."""
    x = noise(125, seed=126)
    with model.memory(60, max_new_tokens=24, exact=True) as mem:
        feeder = threading.Thread(target=feed, args=(mem, x, 0.25), daemon=True)
        feeder.start()
        answers = []
        while feeder.is_alive():
            answers.append(mem.ask(QUESTION, max_new_tokens=4))
        feeder.join(timeout=300)
        assert answers and all(a.finish_reason in ("stop", "length") for a in answers)
        mem.flush()
        assert mem.wait_exact(timeout=120) and mem._rebuilder.error is None
        assert mem.span() == [(60.0, 125.0)]
        # every held window's KV freshly computed: by a rebuild, or never shifted (a window evicted
        # before a question let it into the KV leaves no approximation; the rebuild itself is
        # proven by the test above)
        assert all(w.label == w.key for w in mem.held), mem.stats
        ans = mem.ask(QUESTION, max_new_tokens=24)
    assert list(ans.tokens) == want(reference, x[60 * RATE :])


def test_a_time_range_from_the_archive_on_disk(model, reference, tmp_path):
    """--memory-dir: every full window's rows on disk; a question about 0-30 s after that window
    was evicted is answered from them as the reference answers about the first 30 s."""
    x = noise(95, seed=7)
    with model.memory(30, max_new_tokens=24, directory=tmp_path / "mem", tail_every=None) as mem:
        feed(mem, x, block=5.0)
        assert mem.span() == [(60.0, 90.0)]
        ans = mem.ask(QUESTION, at=(0, 30), max_new_tokens=24)
        with pytest.raises(OptionsError, match="nothing remembered"):
            mem.ask(QUESTION, at=(200, 260))
    assert list(ans.tokens) == want(reference, x[: 30 * RATE])
    index = [json.loads(line) for line in (tmp_path / "mem" / "index.jsonl").read_text().splitlines()]
    assert [i["index"] for i in index] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "mem").glob("*.npy")) == ["w000000.npy", "w000001.npy", "w000002.npy"]
    assert not list((tmp_path / "mem").glob("*.tmp"))


def test_silence_is_skipped_and_its_place_recorded(model, reference):
    x = np.concatenate([noise(30, seed=1), np.zeros(30 * RATE, np.float32), noise(30, seed=2)])
    with model.memory(120, max_new_tokens=24, skip_silence=True) as mem:
        feed(mem, x, block=1.0)
        assert [w.index for w in mem.held] == [0, 2] and mem.stats.skipped == 1
        assert mem.span() == [(0.0, 30.0), (60.0, 90.0)]
        ans = mem.ask(QUESTION, max_new_tokens=24)
    assert list(ans.tokens) == want(reference, np.concatenate([x[: 30 * RATE], x[60 * RATE :]]))


def test_a_question_in_flight_holds_new_windows_back(model):
    with model.memory(120, max_new_tokens=8, tail_every=None) as mem:
        feed(mem, noise(30, seed=3), block=5.0)
        stream = mem.stream(QUESTION, max_new_tokens=8)
        next(stream)
        with pytest.raises(SessionBusyError):
            mem.stream("And?")
        rows = model.llm.decoded_rows  # positions llama.cpp decoded (a counter, no clock)
        feed(mem, noise(30, seed=4), block=5.0)  # encoded now, prefilled after the answer
        assert model.llm.decoded_rows == rows and len(mem.held) == 2
        stream.result()
        rows = model.llm.decoded_rows
        ans = mem.ask(QUESTION, max_new_tokens=8)  # the held-back window goes in first
        assert ans.timings.audio_tokens == 1500 and model.llm.decoded_rows - rows >= 750


def test_a_gap_abandons_the_window_in_progress(model):
    with model.memory(120, max_new_tokens=8, tail_every=None) as mem:
        feed(mem, noise(40, seed=5), block=5.0)  # window 0, and 10 s of window 1
        mem.gap(45.0, windows=1)  # capture fell behind: 45 s lost
        feed(mem, noise(30, seed=6), block=5.0)
        assert [(w.index, w.start_s) for w in mem.held] == [(0, 0.0), (3, 85.0)]
        assert mem.stats.dropped == 1 and mem.windower.lost_s == pytest.approx(55.0)


def test_bad_memories_are_refused_before_anything_is_heard(tiny_bundle, model):
    with pytest.raises(OptionsError, match="10 minutes"):
        model.memory(601)
    with pytest.raises(OptionsError, match="every 1 to 29 seconds"):
        model.memory(60, tail_every=0.5)
    with AF3.load(tiny_bundle, n_ctx=4096) as small:
        with pytest.raises(ContextOverflowError, match=r"needs n_ctx >= 15\d\d\d .* has 4096"):
            small.memory(600)
        with pytest.raises(OptionsError, match="n_seq >= 3"):
            small.memory(60, exact=True)
