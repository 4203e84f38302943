"""`listen`'s loop when inference is slow or dies: capture never waits for inference (segments are
dropped and counted instead), a dead worker ends the run with its error instead of a hang, and
capture overflows reach the summary. The engine is a stand-in whose speed the test controls."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_af3.listen import Listener, file_blocks


class StuckStream:
    """A generation that gives one piece, then blocks until the engine is released."""

    def __init__(self, engine):
        self.engine, self.cancelled = engine, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancelled = True

    def __iter__(self):
        self.engine.started.set()
        yield "a"
        assert self.engine.release.wait(60), "the test never released the engine"
        yield "b"


class SlowEngine:
    """A model whose answers take until `release` is set (inference infinitely behind)."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()
        self.asked = 0

    def stream(self, prompt, audio, **options):
        self.asked += 1
        return StuckStream(self)


class BrokenEngine:
    def stream(self, prompt, audio, **options):
        raise RuntimeError("the encoder engine failed")


def seconds(n: float) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(int(n * 16000))).astype(np.float32)


def test_capture_never_waits_for_inference_and_drops_are_reported():
    """Ten 0.5 s windows while the engine is stuck on the first: the loop still consumes every
    block (it would hang otherwise), keeps the newest window waiting, drops the eight between,
    and answers the two it kept once the engine is released."""
    engine = SlowEngine()
    events = []
    listener = Listener(engine, "x", every_s=0.5, wait=False, on_event=events.append)
    consumed = []

    def blocks():
        waited = False
        for b in file_blocks(seconds(5.0), realtime=False):
            if not waited and sum(x.size for x in consumed) >= 8000:  # the first window was cut and queued
                assert engine.started.wait(30), "the worker never started the first answer"
                waited = True
            consumed.append(b)
            yield b
        assert waited and not engine.release.is_set()  # every block was taken while inference was stuck
        engine.release.set()

    summary = listener.run(blocks())
    assert summary["segments"] == 10
    assert summary["dropped"] == 8 and summary["answered"] == 2 and engine.asked == 2
    dropped = [e for e in events if e.kind == "dropped"]
    assert len(dropped) == 8 and all(e.info["reason"] == "inference is behind" for e in dropped)
    assert [e.text for e in events if e.kind == "done"] == ["ab", "ab"]


@pytest.mark.parametrize("wait", [True, False])
def test_a_dead_worker_ends_the_run_with_its_error(wait):
    """The worker dies on the first segment; with the queue full (file mode waits for a free
    place; the end-of-stream marker too) the run ends with the worker's error, not a hang."""
    listener = Listener(BrokenEngine(), "x", every_s=0.5, wait=wait)
    with pytest.raises(RuntimeError, match="encoder engine failed"):
        listener.run(file_blocks(seconds(5.0), realtime=False))
    assert not listener.worker.is_alive()


def test_capture_overflows_reach_the_summary():
    class Source:
        overflows = 3

        def __iter__(self):
            return iter(file_blocks(seconds(1.0), realtime=False))

    engine = SlowEngine()
    engine.release.set()
    summary = Listener(engine, "x", every_s=0.5, wait=True).run(Source())
    assert summary["overflows"] == 3 and summary["answered"] == 2
