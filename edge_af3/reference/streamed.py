"""transformers' LLM of an AF3 checkpoint, run one part at a time: the export's LLM check for models
whose whole reference would not fit in memory (the 7B: 30 GB in float32, 15 GB in bfloat16).

The checkpoint's Qwen2 is built by transformers without storage (meta device). Before each part
runs (the embedding, each decoder layer, the final norm, the LM head) its tensors are read from the
safetensors files, in float32; after it, they are dropped again. The arithmetic is transformers'
own modules' forward on the checkpoint's own weights: only where the weights live differs, so the
logits are the whole model's (tests/test_export_memory.py checks them against `load_reference` on a
small checkpoint). Peak: the largest part (the 7B's embedding or LM head, 2.2 GB in float32) and
the activations, instead of the model.

A PEFT LoRA (AF3's `think/`) is merged into each layer as it is read: W + (alpha / r) * B @ A, the
weights PEFT's own `merge_and_unload` computes (checked against `PeftModel` on a small checkpoint).
Only text prompts: the LLM check's probe has no audio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _llm_key(disk_name: str) -> str | None:
    """On-disk AF3 name -> `Qwen2ForCausalLM`'s parameter name (None: not an LLM tensor)."""
    from ..export.gguf_llm import llm_name

    rest = llm_name(disk_name)
    if rest is None:
        return None
    return rest if rest.startswith("lm_head.") else "model." + rest


class StreamedLLM:
    """`logits(ids)` of the checkpoint's LLM with at most one part's weights in memory at a time."""

    def __init__(self, ckpt: str | Path, adapter: str | Path | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..export.tensors import iter_names

        self.ckpt = Path(ckpt)
        cfg = AutoConfig.from_pretrained(str(self.ckpt)).text_config
        cfg._attn_implementation = "sdpa"  # what from_pretrained picks for the reference
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=cfg)  # its inv_freq is computed, not stored
        self.model = model.eval()
        self.index = {}
        for name, shard in iter_names(self.ckpt):
            key = _llm_key(name)
            if key is not None:
                self.index[key] = (shard, name)
        if "lm_head.weight" not in self.index:  # the exporter refuses it first (gguf_llm.require_lm_head)
            from ..export.gguf_llm import require_lm_head

            require_lm_head(self.ckpt, set(), {"text_config": cfg.to_dict()})
        self.lora = self._read_lora(Path(adapter)) if adapter else {}
        self.names = {}
        parts = [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]
        prefixes = {id(m): n for n, m in model.named_modules()}
        for part in parts:
            self.names[id(part)] = prefixes[id(part)]
            part.register_forward_pre_hook(self._load)
            part.register_forward_hook(self._drop)

    def _read_lora(self, folder: Path) -> dict:
        """{parameter name: (scale, A, B)} of the adapter, as float32 tensors."""
        import torch

        from ..checkpoint import read_config
        from ..export.adapters import read_lora

        r, alpha, pairs = read_lora(folder, read_config(self.ckpt))
        return {
            f"model.layers.{layer}.{module}.weight": (alpha / r, torch.from_numpy(ab["A"]), torch.from_numpy(ab["B"]))
            for (layer, module), ab in pairs.items()
        }

    def _load(self, module, args):
        import torch

        prefix = self.names[id(module)]
        state = {}
        for local, _ in module.named_parameters():
            key = f"{prefix}.{local}"
            if key not in self.index:
                raise ValueError(f"{self.ckpt}: no tensor for the LLM's {key}")
            shard, disk = self.index[key]
            w = shard.get(disk).to(torch.float32)
            if key in self.lora:
                scale, a, b = self.lora[key]
                w = w + scale * (b.float() @ a.float())
            state[local] = w
        module.load_state_dict(state, strict=True, assign=True)

    def _drop(self, module, args, output):
        module.to("meta")

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [T, vocab] (float32) for the prompt `ids`, as the whole model in float32 gives them."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=False)
        return out.logits[0].float().numpy()
