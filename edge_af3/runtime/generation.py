"""One answer being generated: its sampler, its text and the rules that end it, written once.

The in-process `Stream`, the server's slots and the listener (through `Stream`) all drive a
`Generation`: they decode, it samples from the logits the decode left, turns the token into text
(UTF-8 split across tokens, stop strings held back until they are told apart) and says whether
the answer ended and why. What it never does is decode: the caller owns the KV cache.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterable

from .types import FinishReason, GenerationOptions, StopScanner


class Generation:
    """Sampler chain + text + finish rules for one answer on `llm` (a `LlamaEngine`).

    `penalty_ids`: the prompt as transformers' repetition penalty counts it (every prompt id,
    `<sound>` for each audio row), fed to the sampler before the first draw.
    """

    def __init__(self, llm, options: GenerationOptions, eos: frozenset[int], penalty_ids: Iterable[int] = ()):
        self.llm, self.options, self.eos = llm, options, eos
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.text = ""  # the whole answer, once ended
        self.t_first: float | None = None  # when the first token was sampled
        self.t_last: float | None = None  # when the last kept token was sampled
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._scan = StopScanner(options.stop)
        self._sampler = llm.make_sampler(options)
        if options.repetition_penalty != 1.0:  # transformers counts the whole input, <sound> ids included
            llm.accept(self._sampler, penalty_ids)

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None

    def sample(self, index: int = -1) -> int:
        """Draw the next token from row `index` of the last decode's logits."""
        return self.llm.sample(self._sampler, index)

    def take(self, token: int, n_past: int, n_ctx: int) -> str:
        """A sampled token: returns the text it releases and ends the answer when it must (eos, a
        stop string, max_new_tokens, or a context of `n_past` positions already full at `n_ctx`).
        The caller decodes the token next only while the answer has not ended."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        if token in self.eos and not self.options.ignore_eos:
            return self.finish("stop")
        self.tokens.append(token)
        self.t_last = now
        piece = self._scan.feed(self._decoder.decode(self.llm.piece(token)))
        if self._scan.hit:
            return piece + self.finish("stop")
        if len(self.tokens) >= self.options.max_new_tokens:
            return piece + self.finish("length")
        if n_past >= n_ctx:  # the token is kept, but there is no room to decode it
            return piece + self.finish("context")
        return piece

    def finish(self, reason: FinishReason) -> str:
        """End the answer (idempotent): frees the sampler, returns the text held back until now."""
        if self.finish_reason is not None:
            return ""
        tail = self._scan.feed(self._decoder.decode(b"", final=True)) + self._scan.flush()
        self.close()
        self.finish_reason = reason
        self.text = self._scan.text
        return tail

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_s(len(self.tokens), self.t_first, self.t_last)

    def close(self) -> None:
        if self._sampler is not None:
            self.llm.free_sampler(self._sampler)
            self._sampler = None


def tokens_per_s(n: int, t_first: float | None, t_last: float | None) -> float:
    """Decode speed: the tokens after the first over the time from the first to the last."""
    dt = (t_last or 0.0) - (t_first or 0.0)
    return (n - 1) / dt if n > 1 and dt > 0 else 0.0
