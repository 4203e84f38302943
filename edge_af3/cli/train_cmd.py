"""`edge-af3 train`: the reference LoRA trainer."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import MissingDependencyError
from .common import console, emit_json, out


def train_cmd(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="AF3 checkpoint folder (HF layout)."),
    data: Path = typer.Argument(..., metavar="DATA", help="JSONL: {audio, prompt, answer} or {messages} per line."),
    out_dir: Path = typer.Argument(
        ..., metavar="OUT_DIR", help="Folder for the adapter (PEFT layout) and its checkpoints."
    ),
    base_adapter: str | None = typer.Option(
        None, "--base-adapter", help="Start from the checkpoint's adapter folder (e.g. think)."
    ),
    r: int = typer.Option(16, "--r", help="LoRA rank."),
    alpha: int = typer.Option(32, "--alpha", help="LoRA alpha (scale = alpha / r)."),
    targets: str = typer.Option("q,k,v,o,gate,up,down", "--targets", help="LLM linear layers to adapt."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the data."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate (AdamW)."),
    batch: int = typer.Option(1, "--batch", help="Examples per step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Steps' worth of examples per optimizer update."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warm-up steps."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same data order, same adapter."),
    save_every: int = typer.Option(50, "--save-every", help="Write a resumable checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT_DIR."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per step, then the summary."),
) -> None:
    """Fine-tune a LoRA on AF3's LLM (transformers + PEFT; loss on the answers only), then export
    it with `edge-af3 export CKPT BUNDLE --adapter NAME=OUT_DIR` and ask with `--adapter NAME`.

    \b
    Example: edge-af3 train ./af3 data.jsonl ./my-adapter --max-steps 200 --lr 1e-4
    """
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"training needs {e.name}: pip install 'edge-af3[export,train]'") from None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..train import TrainConfig, train
    from .common import quiet_transformers

    quiet_transformers()

    config = TrainConfig(
        r=r,
        alpha=alpha,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch=batch,
        grad_accum=grad_accum,
        seed=seed,
        warmup_steps=warmup,
        save_every=save_every,
        base_adapter=base_adapter,
    )
    # every check that needs no weights, before any are loaded: the options, each JSONL line, the
    # output folder; then the steps the run will take, and why
    from ..errors import OptionsError
    from ..train import plan_steps, read_examples

    config.check()
    examples = read_examples(data)
    target = out_dir.expanduser()
    if target.exists() and any(target.iterdir()) and not resume:
        raise OptionsError(f"{target} is not empty; pass --resume to continue a run there, or choose another folder")
    total, why = plan_steps(len(examples), config)
    console.print(f"[dim]training {why}[/]", highlight=False)
    columns = (
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=as_json) as bar:
        task = bar.add_task("train", total=total, loss=float("nan"))

        def show(state):
            bar.update(task, completed=state["step"], total=state["total"], loss=state["loss"])
            if as_json:
                emit_json({"step": state["step"], "loss": state["loss"], "lr": state["lr"]})

        result = train(ckpt, data, out_dir, config, resume=resume, progress=show)
    if as_json:
        emit_json({k: v for k, v in result.items() if k != "losses"} | {"final_loss": result["losses"][-1]})
        return
    first, last = result["losses"][0], result["losses"][-1]
    out.print(
        f"[green]adapter[/] {result['out']}: {result['steps']} steps, loss {first:.4f} -> {last:.4f}, "
        f"{result['steps_per_s']:.2f} steps/s"
    )
