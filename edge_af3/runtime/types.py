"""What a generation takes and gives: options, timings, the answer and why it ended."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Literal

from ..constants import DEFAULT_MAX_NEW_TOKENS, EOS_TOKEN_ID
from ..errors import OptionsError

FinishReason = Literal["stop", "length", "context", "cancelled"]
FINISH_REASONS = ("stop", "length", "context", "cancelled")


@dataclass(frozen=True)
class GenerationOptions:
    """How the answer is sampled. A field left None takes the checkpoint's own value from its
    generation_config.json (for nvidia/audio-flamingo-3-hf: temperature 0.7, top_k 20, top_p 0.8,
    repetition_penalty 1.05); a checkpoint without one decodes greedily with no penalty.

    max_new_tokens: most tokens to generate (default 500, the model card's).
    temperature: 0 = greedy (argmax); > 0 samples. Greedy still applies the repetition penalty,
        as transformers does.
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass to keep (1 = off).
    repetition_penalty: transformers' rule over every prompt and answer token (1 = off): a
        positive logit is divided by it, a negative one multiplied, once per distinct token.
    seed: the sampler's seed (the same seed and prompt give the same tokens).
    ignore_eos: generate exactly max_new_tokens (benchmarks, like llama.cpp's --ignore-eos).
    stop: strings that end the answer where they first appear (the text stops before them;
        finish_reason "stop"), up to 16 (OpenAI's `stop`).

    Plain greedy decoding: `temperature=0, repetition_penalty=1.0`.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
            raise OptionsError(f"stop must be up to 16 non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if self.temperature is not None and not self.temperature >= 0:
            raise OptionsError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise OptionsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise OptionsError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise OptionsError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **overrides) -> GenerationOptions:
        """`options` (whole) with `overrides` (keywords) on top; unknown names are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise OptionsError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        base = options or cls()
        return dataclasses.replace(base, **overrides) if overrides else base

    def resolved(self, defaults: dict) -> GenerationOptions:
        """Every None filled from the checkpoint's generation config (`defaults`, the manifest's
        `generation` entry). A checkpoint that does not sample (`do_sample` false) defaults to greedy."""
        sample = bool(defaults.get("do_sample", False))
        return dataclasses.replace(
            self,
            temperature=self.temperature
            if self.temperature is not None
            else (float(defaults.get("temperature", 1.0)) if sample else 0.0),
            top_k=self.top_k if self.top_k is not None else (int(defaults.get("top_k", 0)) if sample else 0),
            top_p=self.top_p if self.top_p is not None else (float(defaults.get("top_p", 1.0)) if sample else 1.0),
            repetition_penalty=self.repetition_penalty
            if self.repetition_penalty is not None
            else float(defaults.get("repetition_penalty", 1.0)),
        )


class StopScanner:
    """Cuts streamed text at the first stop string. `feed(piece)` returns what may be shown now:
    text that could still be the start of a stop string is held back until the next piece tells."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = stops
        self.text = ""  # everything released so far
        self.hit = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        buf = self._held + piece
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self._held, self.hit = buf[: min(found)], "", True
        else:
            keep = max(
                (k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0
            )
            out, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.text += out
        return out

    def flush(self) -> str:
        """The held-back tail, at the end of the answer (no stop string came)."""
        out, self._held = ("" if self.hit else self._held), ""
        self.text += out
        return out


def eos_ids(defaults: dict) -> frozenset[int]:
    """The ids that end an answer: the generation config's eos list, else <|im_end|>."""
    eos = defaults.get("eos_token_id", EOS_TOKEN_ID)
    return frozenset(eos if isinstance(eos, list) else [eos]) | {EOS_TOKEN_ID}


@dataclass(frozen=True)
class Timings:
    features_ms: float | None = 0.0  # None: not known here (an answer from a server)
    encoder_ms: float | None = 0.0
    prefill_ms: float | None = 0.0
    first_token_ms: float = 0.0  # from the call to the first token
    decode_tokens_per_s: float = 0.0
    audio_tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt positions the KV cache already held (not decoded again)
    resyncs: int = 0  # times the stream found the context used by another and re-decoded its tail


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: tuple[int, ...]
    timings: Timings
    finish_reason: FinishReason = "stop"
    options: GenerationOptions | None = None  # what was actually applied (checkpoint defaults filled in)
    adapter: str | None = None  # the LoRA adapter that ran (None: the base model)
