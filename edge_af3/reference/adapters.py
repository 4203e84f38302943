"""AF3's adapters on the PyTorch side: the `think/` folder of a test checkpoint, and the reference
model with an adapter applied as AF3 ships it (needs the `train` extra: peft).

The HF release's `think/` holds a PEFT LoRA on the LLM (`adapter_config.json`,
`adapter_model.safetensors`) and `non_lora_trainables.bin`, a torch state dict loaded into the
model with `strict=False` before the LoRA. Which modules that file covers was not visible here
(no weights can be downloaded): NVIDIA's training code is LLaVA's, whose non-LoRA trainables are
the modules trained in full next to the LoRA — the multimodal projector. Test checkpoints mirror
that (the projector's four tensors, under the model's own state-dict names, so `strict=False`
really applies them); the exporter takes any encoder-side subset and refuses keys that match
nothing instead of skipping them as `strict=False` does.
"""

from __future__ import annotations

import json
from pathlib import Path

LLM_TARGETS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
NON_LORA_FILE = "non_lora_trainables.bin"


def target_regex(targets=tuple(LLM_TARGETS)) -> str:
    """PEFT `target_modules` for the LLM's linear layers only (the audio tower has q/k/v too)."""
    mods = "|".join(LLM_TARGETS[t].replace(".", r"\.") for t in targets)
    return rf"model\.language_model\.layers\.\d+\.({mods})"


def write_think(
    ckpt: str | Path, *, seed: int = 0, r: int = 8, alpha: int = 16, out: str | Path | None = None, name: str = "think"
) -> Path:
    """A `think/` folder for a test checkpoint: a LoRA on every LLM linear layer with non-zero B
    (so it changes the outputs) and a non-LoRA file with a perturbed projector."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AudioFlamingo3ForConditionalGeneration

    ckpt = Path(ckpt)
    out = Path(out) if out else ckpt / name
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 7)
    non_lora = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.multi_modal_projector."):
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float32)
            non_lora[key] = (value.float() + 0.5 * value.float().std().clamp(min=1e-3) * noise).contiguous()
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_regex(), bias="none")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:  # B random too (PEFT starts it at zero: the adapter would do nothing)
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if "lora_A" in pname else 0.1))
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    meta = json.loads(cfg_path.read_text())
    meta["base_model_name_or_path"] = None  # a test checkpoint: no Hub id to point at
    cfg_path.write_text(json.dumps(meta, indent=2) + "\n")
    torch.save(non_lora, out / NON_LORA_FILE)
    return out


def read_non_lora(path: str | Path) -> dict:
    """`non_lora_trainables.bin` as tensors only (`weights_only=True`: a file holding anything but
    tensors is refused, never unpickled)."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError and others
        from ..errors import CheckpointError

        raise CheckpointError(f"{path}: not a plain tensor state dict ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        from ..errors import CheckpointError

        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def apply_adapter(model, ckpt: str | Path, name: str = "think", folder: str | Path | None = None):
    """The reference with an adapter as AF3 ships it: the non-LoRA weights loaded with
    strict=False (refused when some match nothing), then `PeftModel.from_pretrained`. `folder`:
    an adapter folder elsewhere than CKPT/NAME (e.g. one the trainer wrote)."""
    from peft import PeftModel

    from ..errors import CheckpointError

    folder = Path(folder) if folder else Path(ckpt) / name
    non_lora = folder / NON_LORA_FILE
    if non_lora.is_file():
        state = read_non_lora(non_lora)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(
                f"{non_lora}: {len(result.unexpected_keys)} key(s) match nothing in the model "
                f"(strict=False would skip them), e.g. {result.unexpected_keys[0]}"
            )
    peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_model.eval()
    return peft_model
