"""A conversation with its audio -> a `Job` the scheduler can run: audio decoded, clips encoded,
the prompt rendered by the checkpoint's template and checked against the context."""

from __future__ import annotations

import warnings

from ..audio import load_audio
from ..prompt import Message, render
from ..runtime.session import check_fits, segments
from ..runtime.types import GenerationOptions
from .scheduler import Job


def prepare(
    model,
    messages: list[Message],
    audios: list[tuple[str, bytes]],
    options: GenerationOptions,
    *,
    think: bool = False,
    adapter: str | None = None,
) -> tuple[Job, list[str]]:
    """Blocking (run it off the event loop): returns the job (no sink yet) and warnings to pass on
    (audio over 600 s is cut). think / adapter as in `AF3.ask` (the whole conversation runs with
    the adapter; its suffix goes on the last user message). Raises the runtime's user errors
    (AudioError, PromptError, ContextOverflowError, OptionsError) before anything reaches the LLM."""
    opts = options.resolved(model.generation)
    name, suffix = model.resolve_adapter(think, adapter)
    if suffix and messages and messages[-1].role == "user":
        last = messages[-1]
        messages = messages[:-1] + [Message(last.role, last.text + suffix, last.n_audio)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fam = model.family
        loaded = [load_audio(data, name=where, limit=fam.max_samples, model=fam.name) for where, data in audios]
        clips = model.clips(loaded, model.encoder_variant(name))
    text = render(model.template, messages, add_generation_prompt=True)
    target = segments(model.llm, text, clips, model.family.around)
    prompt_len = check_fits(target, clips, model.llm.n_ctx, opts.max_new_tokens)
    seconds = sum(c.audio.seconds for c in clips)
    encoded = sum(1 for c in clips if c.pending)
    for clip in clips:  # a clip seen before (same samples) has its rows from the cache already
        model.encode(clip)
    job = Job(
        target=target,
        prompt_len=prompt_len,
        options=opts,
        eos=model.eos_ids,
        sink=_unset,
        audio_tokens=sum(len(c) for c in clips),
        audio_seconds=seconds,
        clips_encoded=encoded,
        clips_cached=len(clips) - encoded,
        adapter=name,
    )
    return job, [str(w.message) for w in caught]


def _unset(kind, value) -> None:  # noqa: ARG001
    raise RuntimeError("a job ran before its sink was set")
