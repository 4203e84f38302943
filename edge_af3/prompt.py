"""Chat template -> segments: text to tokenize, and audio slots (one `<sound>` per audio).

The checkpoint's own template renders the conversation as transformers does. A message's
audios are written as `<sound>` placeholders before its text (as AF3's template does for one
audio); each placeholder is then filled by that audio's rows, so several audios per message and
audio in later turns work the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from .constants import SOUND_TOKEN


@dataclass(frozen=True)
class Message:
    role: str
    text: str
    n_audio: int = 0


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    return env.from_string(template)


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
    """The prompt text, with one `<sound>` per audio of each message."""
    payload = [{"role": m.role, "content": SOUND_TOKEN * m.n_audio + m.text} for m in messages]
    return _compile(template).render(messages=payload, add_generation_prompt=add_generation_prompt)


def split_sound(text: str) -> list[str]:
    """Text pieces around each `<sound>`: n placeholders -> n + 1 pieces."""
    return text.split(SOUND_TOKEN)
