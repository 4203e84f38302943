"""Errors a user can cause, under one base class.

`EdgeAF3Error` is what the CLI catches once (one line, exit 1) and what a server turns into a 4xx
answer; anything else is a bug and keeps its traceback. Each subclass is also a `ValueError`, so
code written against the earlier `ValueError`s keeps working.
"""

from __future__ import annotations


class EdgeAF3Error(Exception):
    """Something the caller can fix: bad audio, a bad bundle or option, a model that is not there."""


class AudioError(EdgeAF3Error, ValueError):
    """Audio that cannot be used: missing, undecodable, empty, not finite, of a bad shape or too short."""


class BundleError(EdgeAF3Error, ValueError):
    """The folder is not a usable edge-af3 bundle."""


class CheckpointError(EdgeAF3Error, ValueError):
    """The source is not a usable AF3 checkpoint."""


class ModelNotFoundError(EdgeAF3Error, ValueError):
    """`source` is neither a bundle, an AF3 checkpoint folder nor a reachable Hub id; says what was tried."""


class ContextOverflowError(EdgeAF3Error, ValueError):
    """The prompt (text + audio rows) does not fit the context; the message names the n_ctx needed."""


class OptionsError(EdgeAF3Error, ValueError):
    """An option out of range or of an unknown name (sampling, device, engine, KV type, n_ctx)."""


class PromptError(EdgeAF3Error, ValueError):
    """A conversation that cannot be rendered: `<sound>` placeholders that do not match the clips,
    an unknown role, an empty message list."""


class SessionBusyError(EdgeAF3Error, RuntimeError):
    """A chat session asked for a new answer while its previous stream is still open."""


class OutputError(EdgeAF3Error, OSError):
    """A place that cannot be written to (a read-only or missing folder, no space)."""


class MissingDependencyError(EdgeAF3Error, ImportError):
    """An optional package this path needs is not installed; the message has the install command."""


class VoiceError(EdgeAF3Error, RuntimeError):
    """Speech output that cannot be made: no engine or voice, a broken voice file, an engine that
    died, no output device."""
