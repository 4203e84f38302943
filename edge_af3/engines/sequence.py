"""One llama.cpp sequence and what its KV cache holds.

A `KVSequence` is one `seq_id` of a `LlamaEngine`'s context: the next position, what each
position holds (a token id, or an audio row's identity `(clip key, row index)`), the LoRA
adapter its KV was computed with, and every change to that KV — chunked decodes of token ids
and float rows, truncation, and removing a range with the later positions shifted back (a
memory that forgets its oldest audio). The engine owns the context and the batches; a sequence
is the one place that writes its own bookkeeping, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ContextOverflowError

if TYPE_CHECKING:
    from .llamacpp import LlamaEngine


class KVSequence:
    """Sequence `id` of `engine`'s context (its own KV cache of `engine.n_ctx` positions)."""

    def __init__(self, engine: LlamaEngine, seq_id: int):
        self.engine = engine
        self.id = seq_id
        self.n_past = 0  # where the next row goes
        self.items: list = []  # what each position holds
        self.adapter: str | None = None  # the LoRA adapter its KV was computed with

    def __repr__(self) -> str:
        return f"KVSequence(id={self.id}, n_past={self.n_past}, adapter={self.adapter!r})"

    # -- decoding ---------------------------------------------------------------------------
    def check_room(self, n: int) -> None:
        need = self.n_past + n
        if need > self.engine.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {need} positions but n_ctx is {self.engine.n_ctx}; "
                f"load the model with n_ctx >= {need}"
            )

    def advanced(self, items: Sequence) -> None:
        """The engine decoded `items` at this sequence's next positions."""
        self.n_past += len(items)
        self.items.extend(items)

    def decode_tokens(self, ids: Sequence[int], *, logits: str = "last") -> np.ndarray | None:
        """Feed token ids, n_batch per decode. logits: 'last' -> [vocab] of the last id,
        'all' -> [n, vocab], 'none'."""
        ids = list(ids)
        self.check_room(len(ids))
        eng = self.engine
        collected = []
        for start in range(0, len(ids), eng.n_batch):
            chunk = ids[start : start + eng.n_batch]
            mode = logits if (logits == "all" or start + eng.n_batch >= len(ids)) else "none"
            eng.run_tokens(chunk, mode, self)
            if mode == "all":
                collected.append(eng.logits_rows(len(chunk)))
        if logits == "all":
            return np.concatenate(collected) if collected else np.empty((0, eng.n_vocab), np.float32)
        if logits == "last" and ids:
            return eng.last_logits((len(ids) - 1) % eng.n_batch)
        return None

    def decode_rows(self, rows: np.ndarray, *, ids: Sequence | None = None, logits: str = "none") -> np.ndarray | None:
        """Feed float rows [n, n_embd] (audio) at the next positions, n_batch per decode.
        `ids`: a hashable identity per row, for prefix reuse (default: never equal to anything)."""
        eng = self.engine
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != eng.n_embd:
            raise ValueError(f"embedding rows must be [n, {eng.n_embd}], got {rows.shape}")
        if ids is not None and len(ids) != rows.shape[0]:
            raise ValueError(f"{len(ids)} row ids for {rows.shape[0]} rows")
        self.check_room(rows.shape[0])
        ids = list(ids) if ids is not None else [object() for _ in range(rows.shape[0])]
        collected = []
        for start in range(0, rows.shape[0], eng.n_batch):
            chunk = rows[start : start + eng.n_batch]
            mode = logits if (logits == "all" or start + eng.n_batch >= rows.shape[0]) else "none"
            eng.run_rows(chunk, ids[start : start + eng.n_batch], mode, self)
            if mode == "all":
                collected.append(eng.logits_rows(chunk.shape[0]))
        if logits == "all":
            return np.concatenate(collected)
        if logits == "last":
            return eng.last_logits((rows.shape[0] - 1) % eng.n_batch)
        return None

    def decode_next(self, token: int) -> None:
        """Feed one sampled token; its logits stay in the context for the next draw (no copy)."""
        self.check_room(1)
        self.engine.run_tokens([token], "last", self)

    # -- changing what the KV holds ---------------------------------------------------------
    def truncate(self, n_past: int) -> None:
        """Forget every position >= n_past (the KV keeps the prefix)."""
        self.engine.memory_remove(self.id, n_past, -1)
        self.n_past = min(self.n_past, n_past)
        del self.items[n_past:]

    def remove(self, start: int, end: int, *, moved: Sequence | None = None) -> None:
        """Forget positions [start, end) and move every later position back by `end - start`:
        llama.cpp re-rotates the kept keys (RoPE) so they read as if decoded at their new
        positions. What a rolling audio memory does when it drops its oldest window.
        moved: what the moved positions hold from now on, one item each (the audio memory names
        its approximation); default: marked so that no prompt's prefix matches them."""
        if not 0 <= start <= end <= self.n_past:
            raise ValueError(f"cannot remove positions [{start}, {end}) of a sequence of {self.n_past}")
        if moved is not None and len(moved) != self.n_past - end:
            raise ValueError(f"{len(moved)} items for the {self.n_past - end} moved positions")
        if start == end:
            return
        if end == self.n_past:
            return self.truncate(start)
        if not self.engine.can_shift():  # checked before anything is removed: no half-done change
            raise RuntimeError("this model's KV cache cannot shift positions")
        self.engine.memory_remove(self.id, start, end)
        self.engine.memory_shift(self.id, end, self.n_past, start - end)
        # the moved positions were computed attending to what was removed: they are no fresh
        # prefill of the same items, so a prompt's prefix never matches them from here on
        self.items[start:] = list(moved) if moved is not None else [("shifted", item) for item in self.items[end:]]
        self.n_past -= end - start

    def emptied(self) -> None:
        """The engine cleared the whole context (every sequence)."""
        self.n_past, self.items, self.adapter = 0, [], None

    def common_prefix(self, items: Iterable) -> int:
        """How many leading positions already hold `items`."""
        n = 0
        for have, want in zip(self.items, items):
            if have != want:
                break
            n += 1
        return n

    def bind(self, adapter: str | None) -> None:
        """This sequence is about to be decoded under `adapter`: KV computed under another adapter
        is never reused (its positions are dropped). Then the context switches to it."""
        if self.adapter != adapter:
            self.truncate(0)
            self.adapter = adapter
        self.engine.activate(adapter)
