"""Find an AF3 checkpoint (local folder or Hub id) and load transformers' reference model.

This module and `reference/` as a whole are for parity tests, export verification and
benchmarks; the runtime never imports it (torch and transformers live in the `export` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import CHECKPOINT_PATTERNS, read_config, resolve_checkpoint, weight_files  # noqa: F401 (re-exported)
from ..constants import SAMPLE_RATE
from ..errors import CheckpointError  # noqa: F401 (re-exported)


@dataclass
class Reference:
    """transformers' AF3 (or Music Flamingo) with its processor: the numerical reference."""

    model: Any  # AudioFlamingo3ForConditionalGeneration
    processor: Any  # AudioFlamingo3Processor
    path: Path

    def inputs(self, conversation: Sequence[dict], *, add_generation_prompt: bool = True):
        """Processor outputs for a chat conversation (audio given as float arrays at 16 kHz)."""
        audios = [c["audio"] for m in conversation for c in m["content"] if c.get("type") == "audio"]
        if len(audios) > 1:
            return self._multi_audio_inputs(conversation, audios, add_generation_prompt)
        return self.processor.apply_chat_template(
            [list(conversation)],
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=True,
            processor_kwargs={"sampling_rate": SAMPLE_RATE},
        )

    def _multi_audio_inputs(self, conversation, audios, add_generation_prompt: bool):
        """The processor's outputs for a conversation with several clips (voice chat: one per
        turn), which transformers' AF3 processor refuses (one audio per text): its own pieces put
        together as it would — the chat template's text, each clip's features and its `<sound>`
        run from the processor alone, the runs expanded in prompt order, windows stacked in order
        (the model scatters the audio rows into the `<sound>` positions in order)."""
        import torch

        proc = self.processor
        text = proc.apply_chat_template(
            [list(conversation)], tokenize=False, add_generation_prompt=add_generation_prompt
        )[0]
        pieces = text.split(proc.audio_token)
        assert len(pieces) == len(audios) + 1, "one <sound> per clip"
        each = [proc(text=[proc.audio_token], audio=[a], sampling_rate=SAMPLE_RATE) for a in audios]
        counts = [int((e["input_ids"] == proc.audio_token_id).sum()) for e in each]
        bos, eos = getattr(proc, "audio_bos_token", ""), getattr(proc, "audio_eos_token", "")  # Music Flamingo's
        expanded = pieces[0] + "".join(bos + proc.audio_token * n + eos + piece for n, piece in zip(counts, pieces[1:]))
        ids = proc.tokenizer(expanded, return_tensors="pt", add_special_tokens=False)
        return {
            "input_ids": ids["input_ids"],
            "attention_mask": ids["attention_mask"],
            "input_features": torch.cat([e["input_features"] for e in each]),
            "input_features_mask": torch.cat([e["input_features_mask"] for e in each]),
        }

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

    def clip_rows(self, audio: np.ndarray) -> np.ndarray:
        """The rows [n, H] the model scatters into one 16 kHz clip's `<sound>` positions, by its own
        `get_audio_features` (Music Flamingo's time embedding included)."""
        import torch

        conversation = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "x"}]}]
        batch = self.inputs(conversation)
        with torch.inference_mode():
            out = self.model.model.get_audio_features(
                batch["input_features"], batch["input_features_mask"], input_ids=batch["input_ids"]
            )
        return out.pooler_output.float().numpy()

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
    from transformers import (
        AudioFlamingo3ForConditionalGeneration,
        AutoProcessor,
        MusicFlamingoForConditionalGeneration,
    )

    path = resolve_checkpoint(src, revision=revision)
    cfg = read_config(path)
    weight_files(path)
    processor = AutoProcessor.from_pretrained(str(path))
    cls = (
        MusicFlamingoForConditionalGeneration
        if cfg["model_type"] == "musicflamingo"
        else AudioFlamingo3ForConditionalGeneration
    )
    model = cls.from_pretrained(str(path), dtype=getattr(torch, dtype))
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
