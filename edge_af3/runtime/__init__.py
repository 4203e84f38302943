"""The fused runtime: features (numpy) -> encoder engine -> audio rows into llama.cpp at the
`<sound>` slots -> streamed text. No torch.

    model = AF3.load("./af3-bundle")
    print(model.ask("What do you hear?", "clip.wav").text)
    with model.stream("Describe it.", "clip.wav") as s:
        for piece in s: print(piece, end="")
    print(s.answer.finish_reason)
    chat = model.chat(); chat.ask("What is this?", "clip.wav"); chat.ask("And the tempo?")
    memory = model.memory(600); memory.feed(block); memory.ask("What was said?")

Modules: types (options, timings, answer), clips (rows, cache, encoder thread), stream (one
generation), session (conversation + KV bookkeeping), model (AF3), locate (bundle | checkpoint | Hub id),
memory + windows (the always-on audio memory).
"""

from ..errors import ContextOverflowError, ModelNotFoundError
from .clips import Clip
from .encoding import cut_frames, iter_windows
from .locate import locate
from .memory import Memory
from .model import AF3
from .session import ChatSession
from .stream import Stream
from .types import FINISH_REASONS, Answer, GenerationOptions, Timings

__all__ = [
    "AF3",
    "Answer",
    "ChatSession",
    "Clip",
    "ContextOverflowError",
    "FINISH_REASONS",
    "GenerationOptions",
    "Memory",
    "ModelNotFoundError",
    "Stream",
    "Timings",
    "cut_frames",
    "iter_windows",
    "locate",
]
