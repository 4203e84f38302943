"""Filling one llama.cpp sequence with a prompt, decoding only what its KV cache lacks: written
once for the in-process streams (which run it to the end in one step) and the server's slots
(one chunk of at most n_batch rows per scheduler step, so a long prompt never stalls the others).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import ContextOverflowError
from .clips import Clip, items


class Prefill:
    """Make sequence `seq` of `llm` hold `target` (token id lists and clips) computed with
    `adapter`. Nothing happens until the first `next()` (a scheduler creates it outside the model
    lock); each `next()` decodes one chunk and returns True for the last, whose final row keeps its
    logits. `reused` is the prefix the cache already held, `decoded` the positions decoded.
    `step`: positions per `next()` at most (the server: n_batch); None: a whole token list, or a
    clip's chunk as the encoder hands it over, per `next()` (the engine cuts decodes to n_batch)."""

    def __init__(self, llm, target: list, adapter: str | None = None, seq: int = 0, step: int | None = None):
        self.llm, self.target, self.adapter, self.seq, self.step = llm, target, adapter, seq, step
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
        llm = self.llm
        if self.total > llm.n_ctx:
            raise ContextOverflowError(f"the prompt needs {self.total} positions but n_ctx is {llm.n_ctx}")
        llm.bind(self.seq, self.adapter)  # a cache made under another adapter is dropped
        # at least one position is decoded: its logits are the first draw's
        self.reused = min(llm.common_prefix(items(self.target), self.seq), self.total - 1)
        llm.truncate(self.reused, self.seq)

    def _run(self) -> Iterator[bool]:
        self._start()
        llm, seq = self.llm, self.seq
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
                    llm.activate(self.adapter)  # another sequence's adapter may have decoded since
                    if isinstance(seg, Clip):
                        ids = [(seg.key, j) for j in range(lo, hi)]
                        llm.decode_embeddings(part[lo - pos : hi - pos], ids=ids, logits=mode, seq=seq)
                    else:
                        llm.decode_tokens(part[lo - pos : hi - pos], logits=mode, seq=seq)
                    self.decoded += hi - lo
                    yield last
                pos = hi_all
