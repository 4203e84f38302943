"""`edge-af3 ...`: the typer app. Each command is a few lines over the library (one module per
command group); user errors (EdgeAF3Error) are caught once, in `main`: one line, exit 1."""

from __future__ import annotations

import signal
import sys
import warnings

import typer

from ..errors import EdgeAF3Error
from . import ask, listen_cmd, models, serve, system, tools, train_cmd
from .common import console, error_line


def _version(value: bool) -> None:
    if value:
        import llama_cpp

        from .. import __version__

        print(f"edge-af3 {__version__} (llama-cpp-python {llama_cpp.__version__}, Python {sys.version.split()[0]})")
        raise typer.Exit()


app = typer.Typer(
    name="edge-af3",
    help="Run NVIDIA Audio Flamingo 3 on the edge: export, ask, chat, listen, serve, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no "<bool>" type column, no boxes breaking sentences
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:  # noqa: ARG001
    """Run NVIDIA Audio Flamingo 3 on the edge: export, ask, chat, listen, serve, train."""


app.command("make-tiny")(tools.make_tiny)
app.command("export")(tools.export_cmd)
app.command("features")(tools.features_cmd)
app.command("demo")(tools.demo)
app.command("ask", context_settings={"allow_interspersed_args": True})(ask.ask_cmd)
app.command("chat")(ask.chat_cmd)
app.command("listen")(listen_cmd.listen_cmd)
app.command("serve")(serve.serve_cmd)
app.command("train")(train_cmd.train_cmd)
app.add_typer(models.app, name="models")
app.command("plan")(system.plan_cmd)
app.command("doctor")(system.doctor_cmd)
app.command(
    "bench",
    add_help_option=False,  # --help reaches the suite: it lists the suite's own options
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(system.bench_cmd)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    console.print(f"[yellow]warning:[/] {message}", highlight=False)


def main() -> None:
    """Console entry point: a user error is one line and exit 1; Ctrl-C exits 130 without a traceback."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    warnings.showwarning = _warning_line  # warnings as one line, not file:line: source
    try:
        code = app(standalone_mode=False)  # click returns an Exit's code instead of exiting
    except EdgeAF3Error as e:  # one line, with the code the server would answer (docs/cli.md)
        console.print(error_line(e), highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Abort:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click's own usage errors (typer vendors click) keep their message and code
        if type(e).__name__.endswith(
            ("UsageError", "BadParameter", "NoSuchOption", "MissingParameter", "ClickException", "FileError")
        ) and hasattr(e, "show"):
            e.show()
            sys.exit(getattr(e, "exit_code", 2))
        raise
    code = code if isinstance(code, int) else 0
    if code == 130:  # typer turns Ctrl-C inside a command into Exit(130)
        console.print("interrupted")
    sys.exit(code)
