"""A conversation over audio, and the KV bookkeeping every generation shares.

The history is a list of segments (token id lists and clips) that the KV cache should hold.
Each turn keeps whatever prefix the cache already holds, from this session or any other (a
follow-up costs only its own tokens; a new question about the same clip skips the system prompt
and the clip's rows; a new clip still skips the system prompt), and decodes the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ContextOverflowError, PromptError, SessionBusyError
from ..prompt import Message, render, split_sound
from .clips import Clip
from .prefill import Prefill
from .stream import Stream
from .types import Answer, GenerationOptions

if TYPE_CHECKING:
    from .model import AF3


@dataclass
class Turn:
    """One user turn, ready to run: the prompt text, its message, the whole target (history + turn)."""

    full: str
    user: Message
    target: list
    clips: list[Clip]
    prompt_len: int
    adapter: str | None = None  # the LoRA adapter the turn runs with (its KV is never shared with another's)


def segments(llm, text: str, clips: list[Clip], around: tuple[int, int] | None = None) -> list:
    """Prompt text with one `<sound>` per clip -> token id lists and clips, in prompt order.
    `around`: the ids the processor puts before and after each clip's rows (Music Flamingo's
    `<|sound_bos|>` and `<|sound_eos|>`; special tokens, so the text around them tokenizes alone)."""
    pieces = split_sound(text)
    if len(pieces) != len(clips) + 1:
        raise PromptError(f"the prompt has {len(pieces) - 1} <sound> placeholder(s) for {len(clips)} audio clip(s)")
    out: list = []
    for i, piece in enumerate(pieces):
        ids = llm.tokenize(piece)
        if around and i > 0:
            ids = [around[1], *ids]
        if around and i < len(clips):
            ids = [*ids, around[0]]
        if ids:
            out.append(ids)
        if i < len(clips):
            out.append(clips[i])
    return out


def check_fits(target: list, clips: list[Clip], n_ctx: int, max_new_tokens: int) -> int:
    """Positions `target` takes; refused (before anything is encoded) when it leaves no room to answer."""
    total = sum(len(seg) for seg in target)
    if total >= n_ctx:
        raise ContextOverflowError(
            f"the prompt needs {total} positions ({sum(len(c) for c in clips)} of them audio) but n_ctx is "
            f"{n_ctx}; load the model with n_ctx >= {total + max_new_tokens}"
        )
    return total


class ChatSession:
    """A conversation: `ask`/`stream` a turn at a time; the answer joins the history."""

    def __init__(self, model: AF3, system: str | None = None):
        self.model = model
        self.system = system
        self._open: Stream | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the model's caches keep what they hold for others)."""
        if self._open is not None:
            self._open.cancel()
        self.messages: list[Message] = [Message("system", self.system)] if self.system is not None else []
        self.rendered = ""  # prompt text of the history
        self.segments: list = []  # the history as the KV cache holds it: token id lists and clips
        self.prefilled_tokens = 0  # counters for tests: work actually done
        self.last_answer: Answer | None = None

    @property
    def seq(self):
        """The llama.cpp sequence this session's turns run on (the model's shared one)."""
        return self.model.llm.seqs[0]

    @property
    def audio(self) -> list[np.ndarray]:
        """Rows of every clip so far, in prompt order (a clip still encoding is waited for)."""
        return [seg.all_rows() for seg in self.segments if isinstance(seg, Clip)]

    @property
    def n_tokens(self) -> int:
        """Positions the history takes in the context."""
        return sum(len(seg) for seg in self.segments)

    # -- asking -----------------------------------------------------------------------------
    def stream(
        self,
        prompt: str,
        audio=None,
        *,
        think: bool = False,
        adapter: str | None = None,
        options: GenerationOptions | None = None,
        **overrides,
    ) -> Stream:
        """A `Stream` of the answer to `prompt` about `audio` (None, one clip or a list; each a path,
        file bytes, `(array, sample_rate)` or an `Audio`). think: AF3's think mode (its prompt
        suffix, and the bundle's `think` adapter when it has one). adapter: an exported adapter by
        name (the whole conversation is then computed with it). options / overrides:
        `GenerationOptions` whole and/or as keywords
        (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos); what is
        not given is the checkpoint's generation_config.json. Audio, prompt and context are checked
        here; encoding and decoding happen as the stream is iterated."""
        if self._open is not None and self._open.answer is None:
            raise SessionBusyError("this session's previous answer is still streaming; finish or cancel() it first")
        opts = GenerationOptions.of(options or self.model.options, **overrides).resolved(self.model.generation)
        turn = self._turn(prompt, audio, think, opts.max_new_tokens, adapter)
        self._open = Stream(self, turn, opts, self.model.eos_ids)
        return self._open

    def ask(
        self,
        prompt: str,
        audio=None,
        *,
        think: bool = False,
        adapter: str | None = None,
        options: GenerationOptions | None = None,
        speak: bool | str = False,
        **overrides,
    ) -> Answer:
        """The whole `Answer` to `prompt` (the arguments of `stream`). speak: say it on the sound
        card while it is written (True: the default voice; a string: a voice spec, as `--voice`),
        returning when it has been said (docs/voice.md)."""
        stream = self.stream(prompt, audio, think=think, adapter=adapter, options=options, **overrides)
        if not speak:
            return stream.result()
        from ..voice import speak_stream

        return speak_stream(stream, speak if isinstance(speak, str) else "auto")

    send = ask  # the chat verb: session.send("And the tempo?")

    def logits(self, prompt: str, audio=None, *, think: bool = False, adapter: str | None = None) -> np.ndarray:
        """Next-token logits [vocab] after the history plus a user turn (parity checks, scoring)."""
        turn = self._turn(prompt, audio, think, 0, adapter)
        model = self.model
        for clip in turn.target:
            if isinstance(clip, Clip):
                model.encode(clip)
        with model.lock:
            self._prefill(turn.target, turn.adapter)
            return model.llm.last_logits()

    # -- internals --------------------------------------------------------------------------
    def _turn(self, prompt: str, audio, think: bool, max_new_tokens: int, adapter: str | None = None) -> Turn:
        model = self.model
        name, suffix = model.resolve_adapter(think, adapter)
        variant = model.encoder_variant(name)
        if any(isinstance(seg, Clip) and seg.variant != variant for seg in self.segments):
            # earlier turns' clips get this turn's encoder rows: the whole conversation runs with it
            self.segments = [
                model.clips(seg.audio, variant)[0] if isinstance(seg, Clip) else seg for seg in self.segments
            ]
        clips = model.clips(audio, variant)
        user = Message("user", prompt + suffix, n_audio=len(clips))
        full = render(model.template, self.messages + [user], add_generation_prompt=True)
        if not full.startswith(self.rendered):
            raise RuntimeError("the chat template does not render conversations incrementally")
        target = self.segments + segments(model.llm, full[len(self.rendered) :], clips, model.family.around)
        total = check_fits(target, clips, model.llm.n_ctx, max_new_tokens)
        return Turn(full=full, user=user, target=target, clips=clips, prompt_len=total, adapter=name)

    def _prefill(self, target: list, adapter: str | None = None) -> int:
        """Make the KV cache hold `target` (computed with `adapter`), decoding only what it does not
        hold yet; the last decode keeps its logits. Returns how many positions were reused. Call
        with the model lock held."""
        prefill = Prefill(self.seq, target, adapter)
        reused = prefill.run()
        self.prefilled_tokens += prefill.decoded
        return reused

    def _ended(self, stream: Stream, *, failed: bool = False) -> None:
        """A stream of this session ended: a finished turn joins the history (a cancelled or failed
        one does not). The reply is kept as transformers would re-tokenise its text next turn."""
        if self._open is stream:
            self._open = None
        if failed:
            return
        self.last_answer = stream.answer
        if stream.answer.finish_reason == "cancelled":
            return
        self._remember(stream.turn, stream.answer.text)

    def settle(self, stream: Stream, text: str) -> None:
        """The answer `stream` gave, as the user actually got it, becomes its turn's answer in the
        history: a spoken answer interrupted by the user (barge-in) keeps what was heard, whether
        the generation had finished (its full text is replaced) or was cancelled (the turn is
        added). Only the conversation's latest turn can be settled."""
        if stream.answer is None:
            raise SessionBusyError("settle() takes a stream that has ended; cancel() it first")
        if stream.answer.finish_reason != "cancelled":
            if self.messages[-2:-1] != [stream.turn.user]:
                raise SessionBusyError("only the conversation's latest turn can be settled")
            self.messages = self.messages[:-2]  # (_remember renders the history again)
        self._remember(stream.turn, text)

    def _remember(self, turn: Turn, answer: str) -> None:
        self.messages = self.messages + [turn.user, Message("assistant", answer)]
        rendered = render(self.model.template, self.messages, add_generation_prompt=False)
        self.rendered = rendered
        self.segments = turn.target + [self.model.llm.tokenize(rendered[len(turn.full) :])]

    def append(
        self, prompt: str, audio=None, answer: str = "", *, think: bool = False, adapter: str | None = None
    ) -> None:
        """Add a finished turn to the history without generating (restoring a saved conversation);
        the KV cache is filled when the next question is asked."""
        if self._open is not None and self._open.answer is None:
            raise SessionBusyError("this session's answer is still streaming; finish or cancel() it first")
        self._remember(self._turn(prompt, audio, think, 1, adapter), answer)
