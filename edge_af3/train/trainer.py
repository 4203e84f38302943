"""The reference trainer: a LoRA on AF3's LLM, fine-tuned on the transformers model with PEFT.

One example per forward (no padding), `batch` examples x `grad_accum` per optimizer step, AdamW
with a short linear warm-up. Deterministic for a seed: the data order comes from the seed and
the step, so a run resumed from a checkpoint continues exactly where it stopped. Checkpoints
(`OUT/checkpoint-STEP/`: the adapter + optimizer, RNG and step) are written to a temporary
folder and renamed; the final adapter is a PEFT folder in the layout of AF3's `think/`, which
`edge-af3 export --adapter NAME=OUT` turns into a GGUF LoRA.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OptionsError
from .data import encode_example, read_examples


@dataclass
class TrainConfig:
    r: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-4
    batch: int = 1
    grad_accum: int = 1
    seed: int = 0
    warmup_steps: int = 0
    save_every: int = 50
    base_adapter: str | None = None  # start from the checkpoint's adapter folder (e.g. "think")
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        from ..reference.adapters import LLM_TARGETS

        bad = [t for t in self.targets if t not in LLM_TARGETS]
        if bad:
            raise OptionsError(f"unknown LoRA target(s) {', '.join(bad)}; choose from {', '.join(LLM_TARGETS)}")
        for name in ("r", "alpha", "epochs", "batch", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise OptionsError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.lr > 0 or (self.max_steps is not None and self.max_steps < 1):
            raise OptionsError("--lr must be > 0 and --max-steps >= 1")


def plan_steps(n_examples: int, config: TrainConfig) -> tuple[int, str]:
    """(optimizer steps the run takes, the sentence that says why): epochs over the data, or
    --max-steps when it comes first; a --max-steps the data cannot reach is said, with the
    --epochs that would reach it."""
    per_step = config.batch * config.grad_accum
    per_epoch = math.ceil(n_examples / per_step)
    by_data = per_epoch * config.epochs
    how = (
        f"{n_examples} example(s), {per_step} per step ({config.batch} x grad-accum {config.grad_accum}): "
        f"{per_epoch} step(s) per epoch x {config.epochs} epoch(s)"
    )
    if config.max_steps is None:
        return by_data, f"{by_data} steps: {how}"
    if config.max_steps <= by_data:
        return config.max_steps, f"{config.max_steps} steps (--max-steps; the data gives {by_data}: {how})"
    need = math.ceil(config.max_steps / per_epoch)
    return by_data, (
        f"{by_data} steps, not {config.max_steps}: {how} (--epochs {need} reaches --max-steps {config.max_steps})"
    )


def _order(n: int, seed: int, epoch: int) -> list[int]:
    return list(np.random.default_rng([seed, epoch]).permutation(n))


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(
        out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1
    )
    return ckpts[-1] if ckpts else None


def train(
    ckpt: str | Path,
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Fine-tune; returns {steps, losses, seconds, steps_per_s, out}. `progress(state)` after each step."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from ..reference.adapters import NON_LORA_FILE, apply_adapter, target_regex
    from ..reference.loader import load_reference

    config.check()
    examples = read_examples(data)  # every line checked before anything is loaded
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not resume:
        raise OptionsError(f"{out} is not empty; pass --resume to continue a run there, or choose another folder")
    ckpt = Path(ckpt)
    torch.manual_seed(config.seed)
    ref = load_reference(ckpt)
    model = ref.model
    for p in model.parameters():
        p.requires_grad_(False)
    start = latest_checkpoint(out) if resume else None
    if start is not None:
        if config.base_adapter:  # the base adapter's non-LoRA weights first, as at the start of the run
            state = (
                torch.load(ckpt / config.base_adapter / NON_LORA_FILE, weights_only=True)
                if (ckpt / config.base_adapter / NON_LORA_FILE).is_file()
                else {}
            )
            model.load_state_dict(state, strict=False)
        model = PeftModel.from_pretrained(model, str(start), is_trainable=True)
    elif config.base_adapter:
        if not (ckpt / config.base_adapter / "adapter_config.json").is_file():
            raise OptionsError(f"{ckpt} has no adapter folder {config.base_adapter}/")
        model = apply_adapter(model, ckpt, config.base_adapter)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        model = get_peft_model(
            model,
            LoraConfig(
                r=config.r,
                lora_alpha=config.alpha,
                lora_dropout=0.0,
                bias="none",
                target_modules=target_regex(config.targets),
            ),
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    per_step = config.batch * config.grad_accum
    steps_per_epoch = math.ceil(len(examples) / per_step)
    total, _ = plan_steps(len(examples), config)
    step, losses = 0, []
    if start is not None:
        state = torch.load(start / "trainer_state.pt", weights_only=False)  # our own file, written below
        opt.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
        torch.set_rng_state(state["torch_rng"])

    def lr_at(s: int) -> float:  # linear warm-up, then constant (a function of the step: resumes exactly)
        return config.lr * (min(1.0, (s + 1) / config.warmup_steps) if config.warmup_steps else 1.0)

    template = (ckpt / "chat_template.jinja").read_text("utf-8")
    tok, sound_id = ref.processor.tokenizer, ref.processor.audio_token_id
    cache: dict[int, dict] = {}
    t0, first = time.perf_counter(), step
    while step < total:
        epoch, pos = divmod(step * per_step, steps_per_epoch * per_step)
        order = _order(len(examples), config.seed, epoch)
        idx = [order[(pos + j) % len(order)] for j in range(per_step)]
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i in idx:
            if i not in cache:
                cache[i] = {
                    k: torch.from_numpy(v) for k, v in encode_example(examples[i], template, tok, sound_id).items()
                }
            batch = cache[i]
            loss = model(**batch).loss / per_step
            loss.backward()
            step_loss += float(loss.detach())
        lr = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        step += 1
        losses.append(step_loss)
        if progress:
            progress({"step": step, "total": total, "loss": step_loss, "lr": lr})
        if step % config.save_every == 0 or step == total:
            _save(model, opt, step, losses, config, out / f"checkpoint-{step}", torch)
    seconds = time.perf_counter() - t0
    model.save_pretrained(str(out))
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = str(ckpt)
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    if config.base_adapter and (ckpt / config.base_adapter / NON_LORA_FILE).is_file():
        shutil.copyfile(
            ckpt / config.base_adapter / NON_LORA_FILE, out / NON_LORA_FILE
        )  # the encoder side it trained with
    result = {
        "steps": step,
        "losses": losses,
        "seconds": seconds,
        "out": str(out),
        "steps_per_s": (step - first) / seconds if seconds > 0 else 0.0,
        "config": asdict(config),
    }
    (out / "training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _save(model, opt, step: int, losses: list[float], config: TrainConfig, dst: Path, torch) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "step": step,
            "losses": losses,
            "torch_rng": torch.get_rng_state(),
            "config": asdict(config),
        },
        tmp / "trainer_state.pt",
    )
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
