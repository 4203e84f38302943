"""`plan`, `doctor`, `bench`: what this machine (or a target) can run, and how fast."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .common import DeviceOpt, EngineOpt, ExactOpt, KvOpt, ModelOpt, NCtxOpt, emit_json, out, show_plan

TARGETS_HELP = (
    "orin-nano-8gb | orin-nx-16gb | agx-orin-64gb | rtx-4060-laptop | rtx-4090 | h100 (default: this machine)"
)


def plan_cmd(
    bundle: str | None = typer.Argument(
        None, metavar="BUNDLE", help="Bundle, checkpoint folder or Hub id (default: --model / EDGE_AF3_MODEL)."
    ),
    model: ModelOpt = None,
    target: str | None = typer.Option(None, "--target", help=TARGETS_HELP),
    n_ctx: NCtxOpt = None,
    kv_type: KvOpt = None,
    device: DeviceOpt = "auto",
    engine: EngineOpt = None,
    exact: ExactOpt = False,
    encoder_precision: str | None = typer.Option(
        None, "--encoder-precision", help="fp16 | int8 | mixed | fp32 (default: what the engine runs)"
    ),
    as_json: bool = typer.Option(False, "--json", help="The plan as one JSON object."),
) -> None:
    """Dry run: the memory a model needs (weights, encoder, KV cache at n_ctx, buffers) with the
    settings AF3.load would pick here, and whether it fits this machine — or a --target's set-up.
    Nothing is loaded but the GGUF header.

    \b
    Example: edge-af3 plan ./af3 --target orin-nano-8gb --n-ctx 8192 --kv q8_0
    """
    show_plan(
        bundle or model,
        n_ctx=n_ctx,
        kv_type=kv_type,
        device=device,
        encoder_engine=engine,
        exact=exact,
        target=target,
        encoder_precision=encoder_precision,
        as_json=as_json,
    )


def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Also describe this bundle: its adapters and think mode."
    ),
) -> None:
    """Check this machine: Python, packages, ONNX Runtime providers, CUDA/TensorRT, llama.cpp GPU
    offload, audio devices; prints the install command for whatever is missing. With -m BUNDLE:
    the bundle's LLM, encoder and adapters (which adapter think mode runs).

    \b
    Example: edge-af3 doctor -m ./af3-bundle
    """
    from .doctor import checks, model_description, render

    if model is not None:  # what -m names is checked first: a mistake is one line, no report
        model_report = model_description(str(model))
    report = checks()
    if model is not None:
        report["model"] = model_report
    if as_json:
        emit_json(report)
        return
    render(report, out)


def _help_like_the_rest(ap, doc: str) -> None:
    """The suite's argparse options, shown as every other command's --help shows its own."""
    from rich.markup import escape
    from rich.table import Table

    out.print("\n Usage: edge-af3 bench [OPTIONS]\n", highlight=False)
    out.print(" " + " ".join(doc.split("\n\n")[0].split()) + "\n", highlight=False)
    table = Table(box=None, show_header=False, padding=(0, 2))
    for action in ap._actions:
        if not action.option_strings or action.dest == "help":
            continue
        meta = "" if action.nargs == 0 else f"<{(action.type or str).__name__}>" + (" ..." if action.nargs else "")
        value = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        extra = f" [{' | '.join(map(str, action.choices))}]" if action.choices else ""
        default = f" [default: {value}]" if value not in (None, False) else ""
        table.add_row(", ".join(action.option_strings), meta, escape((action.help or "") + extra + default))
    out.print(" Options:", highlight=False)
    out.print(table, highlight=False)


def bench_cmd(ctx: typer.Context) -> None:
    """Run the benchmark suite (edge-af3 vs transformers, llama.cpp's mtmd and raw llama.cpp).

    Takes the options of `python -m benchmarks --help`, e.g.:
      edge-af3 bench --shape bench-small --clips 5 30 --repeats 3
    """
    from ..errors import MissingDependencyError

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "suite.py").is_file():
        raise MissingDependencyError(
            "the benchmarks ship with the source checkout: git clone the project and run `edge-af3 bench` there"
        )
    sys.path.insert(0, str(root))
    from benchmarks.suite import main as suite_main
    from benchmarks.suite import parser

    if {"--help", "-h"} & set(ctx.args):
        _help_like_the_rest(parser(), bench_cmd.__doc__)
        return

    sys.argv[0] = "edge-af3 bench"  # argparse's usage line
    try:
        suite_main(list(ctx.args))
    except SystemExit as e:  # --help, or argparse's own usage errors (exit 2)
        if e.code:
            raise typer.Exit(e.code) from None
