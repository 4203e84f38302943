"""The reference trainer (extra `train`: torch, transformers, peft): LoRA fine-tuning of AF3's LLM
on the transformers model, for export as an adapter (`edge-af3 export --adapter NAME=OUT`)."""

from .data import DataError, Example, read_examples
from .trainer import TrainConfig, latest_checkpoint, plan_steps, train

__all__ = ["DataError", "Example", "TrainConfig", "latest_checkpoint", "plan_steps", "read_examples", "train"]
