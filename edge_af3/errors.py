"""Errors a user can cause, under one base class, each with a stable code.

`EdgeAF3Error` is what the CLI catches once (one line, exit 1) and what the server turns into an
OpenAI-shaped 4xx answer whose `code` is the error's `code`: the same snake_case words in both
(docs/cli.md's table is generated from this module: `python -m edge_af3.errors`). Anything else
is a bug and keeps its traceback. Most kinds are also a `ValueError` (or the builtin they
refine), so code written against the earlier builtins keeps working.
"""

from __future__ import annotations


class EdgeAF3Error(Exception):
    """Something the caller can fix: bad audio, a bad bundle or option, a model that is not there."""

    code = "edge_af3_error"
    where = "anywhere (the base class)"


class AudioError(EdgeAF3Error, ValueError):
    """Audio that cannot be used: missing, empty, undecodable, not finite, of a bad shape or too short."""

    code = "invalid_audio"
    where = "ask, chat, listen --file, features, API calls with audio; server: audio parts, transcriptions"


class BundleError(EdgeAF3Error, ValueError):
    """The folder is not a usable edge-af3 bundle (a file missing, altered or unreadable)."""

    code = "invalid_bundle"
    where = "every command taking -m, models verify, doctor -m, AF3.load"


class CheckpointError(EdgeAF3Error, ValueError):
    """The source is not a usable AF3 checkpoint."""

    code = "invalid_checkpoint"
    where = "export, models pull, -m CHECKPOINT, train, make-tiny --think"


class ModelNotFoundError(EdgeAF3Error, ValueError):
    """`source` is neither a bundle, an AF3 checkpoint folder nor a reachable Hub id; says what was tried."""

    code = "model_not_found"
    where = "every command taking -m, AF3.load; server: a request naming another model (404)"


class ContextOverflowError(EdgeAF3Error, ValueError):
    """The prompt (text + audio rows) does not fit the context; the message names the n_ctx needed."""

    code = "context_length_exceeded"
    where = "ask, chat, listen, API calls; server: chat completions, transcriptions"


class OptionsError(EdgeAF3Error, ValueError):
    """An option out of range or of an unknown name (sampling, device, engine, KV type, quant,
    precision, n_ctx, adapter, voice spec)."""

    code = "invalid_option"
    where = "every command; server: request fields (the field is the error's param)"


class PromptError(EdgeAF3Error, ValueError):
    """A conversation that cannot be rendered: `<sound>` placeholders that do not match the clips,
    an unknown role, an empty message list."""

    code = "invalid_prompt"
    where = "API calls; server: chat completions"


class SessionBusyError(EdgeAF3Error, RuntimeError):
    """A chat session asked for a new answer while its previous stream is still open."""

    code = "session_busy"
    where = "ChatSession.stream / ask / settle (Python API)"


class OutputError(EdgeAF3Error, OSError):
    """A place that cannot be written to (a read-only or missing folder, no space)."""

    code = "output_not_writable"
    where = "export, make-tiny, train, --speak-to, chat /save"


class MissingDependencyError(EdgeAF3Error, ImportError):
    """An optional package this path needs is not installed; the message has the install command."""

    code = "missing_dependency"
    where = "export, serve, listen --mic, --speak, AF3.connect, av formats"


class VoiceError(EdgeAF3Error, RuntimeError):
    """Speech output that cannot be made: no engine or voice, a broken voice file, an engine that
    died, no output device."""

    code = "voice_unavailable"
    where = "--speak, --speak-to, --voice, AF3.ask(speak=...); server: /v1/audio/speech (503)"


class InputDeviceError(EdgeAF3Error, RuntimeError):
    """No usable input device, or the device stopped delivering audio."""

    code = "input_device_unavailable"
    where = "listen --mic"


class QueueFullError(EdgeAF3Error):
    """Every slot is busy and the queue is full: try again later (HTTP 429)."""

    code = "queue_full"
    where = "server: chat completions, transcriptions (429 with Retry-After)"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ServerError(EdgeAF3Error, RuntimeError):
    """A server asked through `AF3.connect` / `--base-url` could not be reached or refused the
    request for a reason of its own; the message names the server and what it said."""

    code = "server_error"
    where = "AF3.connect, ask / chat --base-url"

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ParityError(EdgeAF3Error):
    """An export's figures are below its type's floor: nothing was written."""

    code = "parity_below_floor"
    where = "export, models pull, -m CHECKPOINT (first use)"


class DataError(EdgeAF3Error, ValueError):
    """A training file that cannot be used; the message names the line."""

    code = "invalid_training_data"
    where = "train"


def kinds() -> list[type[EdgeAF3Error]]:
    """Every error kind, the base first."""
    out, todo = [], [EdgeAF3Error]
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(sorted(cls.__subclasses__(), key=lambda c: c.__name__))
    return out


def markdown_table() -> str:
    """The table of error codes in docs/cli.md (generated: `python -m edge_af3.errors`)."""
    rows = ["| code | Python class | what | raised by |", "|---|---|---|---|"]
    for cls in kinds():
        what = " ".join((cls.__doc__ or "").split())
        rows.append(f"| `{cls.code}` | `{cls.__name__}` | {what} | {cls.where} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
