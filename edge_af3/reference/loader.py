"""Find an AF3 checkpoint (local folder or Hub id) and load transformers' reference model.

This module and `reference/` as a whole are for parity tests, export verification and
benchmarks; the runtime never imports it (torch and transformers live in the `export` extra).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..constants import SAMPLE_RATE

CHECKPOINT_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.safetensors",
    "merges.txt",
    "vocab.json",
    "think/*",
]


class CheckpointError(ValueError):
    """The source is not a usable AF3 checkpoint."""


def resolve_checkpoint(src: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder as it is, or a Hub id downloaded into (or, offline, read from) the Hub cache.

    Honours `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE`/`HF_HOME` through huggingface_hub.
    """
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: a checkpoint is a folder, this is a file")
        return path.resolve()
    text = str(src)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such folder, and not a Hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{text}: not in the local Hub cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it once with network access"
        ) from e
    except HFValidationError as e:
        raise CheckpointError(f"{text}: not a valid Hub id ({e})") from e
    except Exception as e:  # network errors, 404s, gated repos: all say what was tried
        raise CheckpointError(f"{text}: could not fetch from the Hub: {e}") from e


def read_config(path: Path) -> dict[str, Any]:
    """config.json of an AF3 checkpoint; refuses anything else with the reason."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json, not an HF checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    kind = cfg.get("model_type")
    if kind != "audioflamingo3":
        raise CheckpointError(f"{path}: model_type is {kind!r}, not 'audioflamingo3' (an AF3 checkpoint is needed)")
    return cfg


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; every shard the index names must exist."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing weight shard(s) {', '.join(missing)}")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


@dataclass
class Reference:
    """transformers' AF3 with its processor: the numerical reference."""

    model: Any  # AudioFlamingo3ForConditionalGeneration
    processor: Any  # AudioFlamingo3Processor
    path: Path

    def inputs(self, conversation: Sequence[dict], *, add_generation_prompt: bool = True):
        """Processor outputs for a chat conversation (audio given as float arrays at 16 kHz)."""
        return self.processor.apply_chat_template(
            [list(conversation)],
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=True,
            processor_kwargs={"sampling_rate": SAMPLE_RATE},
        )

    def generate(self, conversation: Sequence[dict], *, max_new_tokens: int = 32) -> list[int]:
        """Greedy new token ids for a conversation, as the model card runs it."""
        import torch

        batch = self.inputs(conversation)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, batch["input_ids"].shape[1] :].tolist()

    def logits(self, conversation: Sequence[dict], *, add_generation_prompt: bool = True) -> np.ndarray:
        """Logits [T, vocab] of the whole prompt (float32)."""
        import torch

        batch = self.inputs(conversation, add_generation_prompt=add_generation_prompt)
        with torch.inference_mode():
            out = self.model(**batch)
        return out.logits[0].float().numpy()

    def audio_rows(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Projected audio rows [W, 750, H] for features [W, 128, 3000] and mask [W, 3000]."""
        import torch

        m = self.model.model
        with torch.inference_mode():
            dtype = next(m.audio_tower.parameters()).dtype
            enc = m.audio_tower(torch.from_numpy(features).to(dtype), input_features_mask=torch.from_numpy(mask))
            rows = m.multi_modal_projector(enc.last_hidden_state)
        return rows.float().numpy()


def load_reference(src: str | os.PathLike, *, dtype: str = "float32", revision: str | None = None) -> Reference:
    """Load transformers' `AudioFlamingo3ForConditionalGeneration` + `AutoProcessor` from `src`."""
    import torch
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    path = resolve_checkpoint(src, revision=revision)
    read_config(path)
    weight_files(path)
    processor = AutoProcessor.from_pretrained(str(path))
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.eval()
    return Reference(model=model, processor=processor, path=path)


def reference_features(processor: Any, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The reference processor's (features [W,128,3000], mask [W,3000], audio token count) for 16 kHz audio."""
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "x"}]}]
    batch = processor.apply_chat_template(
        [conversation],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
        processor_kwargs={"sampling_rate": SAMPLE_RATE},
    )
    n_tokens = int((batch["input_ids"] == processor.audio_token_id).sum())
    return batch["input_features"].numpy(), batch["input_features_mask"].numpy(), n_tokens
