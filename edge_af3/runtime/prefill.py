"""Filling one llama.cpp sequence with a prompt, decoding only what its KV cache lacks: written
once for the in-process streams (which run it to the end in one step) and the server's slots
(one chunk of at most n_batch rows per scheduler step, so a long prompt never stalls the others).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import ContextOverflowError
from .clips import Clip, items


class Prefill:
    """Make a llama.cpp sequence (`KVSequence`) hold `target` (token id lists and clips) computed with
    `adapter`. Nothing happens until the first `next()` (a scheduler creates it outside the model
    lock); each `next()` decodes one chunk and returns True for the last, whose final row keeps its
    logits. `reused` is the prefix the cache already held, `decoded` the positions decoded.
    `step`: positions per `next()` at most (the server: n_batch); None: a whole token list, or a
    clip's chunk as the encoder hands it over, per `next()` (the engine cuts decodes to n_batch)."""

    def __init__(self, seq, target: list, adapter: str | None = None, step: int | None = None):
        self.seq, self.target, self.adapter, self.step = seq, target, adapter, step
        self.total = sum(len(s) for s in target)
        self.reused = 0
        self.decoded = 0
        self._steps: Iterator[bool] | None = None

    def __iter__(self) -> Prefill:
        return self

    def __next__(self) -> bool:
        if self._steps is None:
            self._steps = self._run()
        return next(self._steps)

    def run(self) -> int:
        """Every chunk now; returns the reused prefix."""
        for _ in self:
            pass
        return self.reused

    def _start(self) -> None:
        seq = self.seq
        if self.total > seq.engine.n_ctx:
            raise ContextOverflowError(f"the prompt needs {self.total} positions but n_ctx is {seq.engine.n_ctx}")
        seq.bind(self.adapter)  # a cache made under another adapter is dropped
        # at least one position is decoded: its logits are the first draw's
        self.reused = min(seq.common_prefix(items(self.target)), self.total - 1)
        seq.truncate(self.reused)

    def _run(self) -> Iterator[bool]:
        self._start()
        seq = self.seq
        last_seg = max(i for i, s in enumerate(self.target) if len(s))
        offset = 0
        for i, seg in enumerate(self.target):
            n, skip = len(seg), max(0, self.reused - offset)
            offset += n
            if skip >= n:
                continue  # held already (a clip still encoding is left to finish on its own)
            pos = 0
            for part in seg.chunks() if isinstance(seg, Clip) else (seg,):  # a clip's rows as the encoder makes them
                lo_all, hi_all = max(skip, pos), pos + len(part)
                step = self.step or max(1, hi_all - lo_all)
                for lo in range(lo_all, hi_all, step):
                    hi = min(hi_all, lo + step)
                    last = i == last_seg and hi == n
                    mode = "last" if last else "none"
                    seq.engine.activate(self.adapter)  # another sequence's adapter may have decoded since
                    if isinstance(seg, Clip):
                        ids = [(seg.key, j) for j in range(lo, hi)]
                        seq.decode_rows(part[lo - pos : hi - pos], ids=ids, logits=mode)
                    else:
                        seq.decode_tokens(part[lo - pos : hi - pos], logits=mode)
                    self.decoded += hi - lo
                    yield last
                pos = hi_all
