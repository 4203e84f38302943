"""Randomly initialised AF3 checkpoints in the real HF layout, for tests and benchmarks.

`make_checkpoint(out, shape=..., seed=...)` writes config, generation config, safetensors (sharded
past 2 GiB, tensor by tensor so the full 8B shape never sits in RAM twice), the real Qwen2
tokenizer with AF3's special tokens, the processor's chat template and feature-extractor config.
Weight names are the on-disk names of `nvidia/audio-flamingo-3-hf` (`audio_tower.*`,
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.weight`).
Same shape and seed give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..bundle import staged_folder
from ..constants import ENDOFTEXT_ID, EOS_TOKEN_ID, SOUND_TOKEN_ID, VOCAB_SIZE


# The processor's chat template, as transformers' AF3 conversion writes it: `<sound>` once per
# message that carries audio, before the message's text parts (concatenated, no separator).
def chat_template(system: str = "You are a helpful assistant.") -> str:
    """The processor's template with `system` as the default system prompt (the conversion of each
    checkpoint writes its own; the rest is the same)."""
    return CHAT_TEMPLATE.replace("You are a helpful assistant.", system)


CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    name: str
    enc_layers: int
    enc_hidden: int
    enc_heads: int
    enc_ffn: int
    llm_layers: int
    llm_hidden: int
    llm_heads: int
    llm_kv_heads: int
    llm_ffn: int
    dtype: str  # on-disk dtype


SHAPES = {
    # Tests: >= 4 encoder layers so llama.cpp's mmproj converter accepts it; a 2-layer LLM.
    "tiny": Shape("tiny", 4, 128, 2, 256, 2, 64, 2, 1, 128, "float32"),
    # Tests of the K-quants: every LLM width a multiple of 256, so Q4_K_M keeps Q4_K/Q6_K tensors
    # (as the real AF3 does) instead of falling back to Q5_0/Q8_0 as at the tiny widths.
    "tiny-k256": Shape("tiny-k256", 4, 128, 2, 256, 2, 256, 4, 1, 512, "bfloat16"),
    # CPU benchmarks: a Whisper-small encoder and a Qwen2.5-0.5B-shaped LLM.
    "bench-small": Shape("bench-small", 12, 768, 12, 3072, 24, 896, 14, 2, 4864, "bfloat16"),
    # The real AF3: AF-Whisper (large-v3 shape) + Qwen2.5-7B.
    "full": Shape("full", 32, 1280, 20, 5120, 28, 3584, 28, 4, 18944, "bfloat16"),
}

SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class Arch:
    """What a family member changes over AF3 in the checkpoint's files (ids and sizes as the
    published checkpoints' configs have them)."""

    model_type: str  # config.json's
    max_audio_len: int  # seconds: the processor's limit (30 s windows)
    text_rope_theta: float = 1_000_000.0
    text_max_positions: int = 32768
    system: str = "You are a helpful assistant."  # the default system prompt of its chat template


# the system prompts transformers' conversions of the published checkpoints write (their wording)
MF_SYSTEM = (
    "You are Music Flamingo, a multimodal assistant for language and music. On each turn you receive an audio "
    "clip which contains music and optional text, you will receive at least one or both; use your world knowledge "
    "and reasoning to help the user with any task. Interpret the entirety of the content any input "
    "music--regardlenss of whether the user calls it audio, music, or sound."
)
AFNEXT_SYSTEM = (
    "You are Audio Flamingo-Next, a multimodal assistant for language and audio. On each turn you receive an "
    "optional audio clip which may contain speech, music, or ambient sounds and optional text, you will receive at "
    "least one or both; use your world knowledge and reasoning to help the user with any task. Interpret the "
    "entirety of the content of any input audio\u2014regardless of whether the user calls it audio, speech, "
    "music, or sound."
)


ARCHS = {
    "audioflamingo3": Arch("audioflamingo3", 600),
    # Music Flamingo: AF3 + rotary time embeddings on the encoder's output, <|sound_bos|>/<|sound_eos|>
    # around each clip's rows, 20 minutes of audio
    "musicflamingo": Arch("musicflamingo", 1200, system=MF_SYSTEM),
    # Audio Flamingo Next: the same architecture (model type musicflamingo), 30 minutes of audio and
    # a long-context Qwen2 (rope_theta 15.3 M, 131 072 positions)
    "afnext": Arch(
        "musicflamingo", 1800, text_rope_theta=15_300_000.0, text_max_positions=131072, system=AFNEXT_SYSTEM
    ),
}
SOUND_BOS_EOS = {151670: "<|sound_bos|>", 151671: "<|sound_eos|>"}  # Music Flamingo's names of the two ids


def config_dict(shape: Shape, arch: Arch = ARCHS["audioflamingo3"]):
    """The config for `shape`, built through transformers so every default is its own."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3EncoderConfig, MusicFlamingoConfig, Qwen2Config

    audio = AudioFlamingo3EncoderConfig(
        num_mel_bins=128,
        num_hidden_layers=shape.enc_layers,
        num_attention_heads=shape.enc_heads,
        intermediate_size=shape.enc_ffn,
        hidden_size=shape.enc_hidden,
        max_source_positions=1500,
    )
    text = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.llm_hidden,
        intermediate_size=shape.llm_ffn,
        num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.llm_heads,
        num_key_value_heads=shape.llm_kv_heads,
        max_position_embeddings=arch.text_max_positions,
        rms_norm_eps=1e-6,
        rope_theta=arch.text_rope_theta,
        tie_word_embeddings=False,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=EOS_TOKEN_ID,
        use_cache=True,
        dtype=shape.dtype,
    )
    if arch.model_type == "musicflamingo":  # rope_parameters: its defaults (theta 1200, partial 0.2)
        cfg = MusicFlamingoConfig(
            audio_config=audio.to_dict(), text_config=text.to_dict(), audio_token_id=SOUND_TOKEN_ID
        )
    else:
        cfg = AudioFlamingo3Config(audio_config=audio, text_config=text, audio_token_id=SOUND_TOKEN_ID)
    cfg.dtype = shape.dtype
    # as the published config.json has it (vLLM picks the generation model by it, not the base model)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForConditionalGeneration")]
    return cfg


def tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(on-disk name, shape, init kind) for every tensor of the checkpoint, in a fixed order."""
    e, f, h, q = shape.enc_hidden, shape.enc_ffn, shape.llm_hidden, shape.llm_ffn
    kv = shape.llm_kv_heads * (h // shape.llm_heads)
    specs = [
        ("audio_tower.conv1.weight", (e, 128, 3), "linear"),
        ("audio_tower.conv1.bias", (e,), "bias"),
        ("audio_tower.conv2.weight", (e, e, 3), "linear"),
        ("audio_tower.conv2.bias", (e,), "bias"),
        ("audio_tower.embed_positions.weight", (1500, e), "embed"),
    ]
    for i in range(shape.enc_layers):
        p = f"audio_tower.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (e, e), "linear"),
            (p + "self_attn.q_proj.bias", (e,), "bias"),
            (p + "self_attn.k_proj.weight", (e, e), "linear"),  # k has no bias
            (p + "self_attn.v_proj.weight", (e, e), "linear"),
            (p + "self_attn.v_proj.bias", (e,), "bias"),
            (p + "self_attn.out_proj.weight", (e, e), "linear"),
            (p + "self_attn.out_proj.bias", (e,), "bias"),
            (p + "self_attn_layer_norm.weight", (e,), "norm"),
            (p + "self_attn_layer_norm.bias", (e,), "bias"),
            (p + "fc1.weight", (f, e), "linear"),
            (p + "fc1.bias", (f,), "bias"),
            (p + "fc2.weight", (e, f), "linear"),
            (p + "fc2.bias", (e,), "bias"),
            (p + "final_layer_norm.weight", (e,), "norm"),
            (p + "final_layer_norm.bias", (e,), "bias"),
        ]
    specs += [
        ("audio_tower.layer_norm.weight", (e,), "norm"),
        ("audio_tower.layer_norm.bias", (e,), "bias"),
        ("multi_modal_projector.linear_1.weight", (h, e), "linear"),
        ("multi_modal_projector.linear_1.bias", (h,), "bias"),
        ("multi_modal_projector.linear_2.weight", (h, h), "linear"),
        ("multi_modal_projector.linear_2.bias", (h,), "bias"),
        ("language_model.model.embed_tokens.weight", (VOCAB_SIZE, h), "embed"),
    ]
    for i in range(shape.llm_layers):
        p = f"language_model.model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), "linear"),
            (p + "self_attn.q_proj.bias", (h,), "bias"),
            (p + "self_attn.k_proj.weight", (kv, h), "linear"),
            (p + "self_attn.k_proj.bias", (kv,), "bias"),
            (p + "self_attn.v_proj.weight", (kv, h), "linear"),
            (p + "self_attn.v_proj.bias", (kv,), "bias"),
            (p + "self_attn.o_proj.weight", (h, h), "linear"),
            (p + "mlp.gate_proj.weight", (q, h), "linear"),
            (p + "mlp.up_proj.weight", (q, h), "linear"),
            (p + "mlp.down_proj.weight", (h, q), "linear"),
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs += [
        ("language_model.model.norm.weight", (h,), "norm"),
        ("language_model.lm_head.weight", (VOCAB_SIZE, h), "head"),
    ]
    return specs


def _random_tensor(name: str, dims: tuple[int, ...], kind: str, seed: int, dtype: str, device: str = "cpu"):
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    x = torch.randn(dims, generator=gen, dtype=torch.float32, device=device)
    fan_in = 1
    for d in dims[1:]:
        fan_in *= d
    if kind == "linear":
        x *= fan_in**-0.5  # keeps activations O(1) through random layers
    elif kind == "bias":
        x *= 0.02
    elif kind == "norm":
        x = 1.0 + 0.1 * x
    elif kind == "embed":
        x *= 1.0
    elif kind == "head":
        x *= 3.0 * dims[1] ** -0.5  # logits ~ N(0, 9): clear greedy winners, stable parity
    return x.to(getattr(torch, dtype)).contiguous().cpu()


def _write_shards(out: Path, specs, make: Callable[[str, tuple, str], object], progress=None) -> None:
    """Stream tensors into <= 2 GiB safetensors shards (+ index when more than one)."""
    from safetensors.torch import save_file

    def groups() -> Iterator[list]:
        group, size = [], 0
        for spec in specs:
            nbytes = 1
            for d in spec[1]:
                nbytes *= d
            nbytes *= 4
            if group and size + nbytes > SHARD_BYTES:
                yield group
                group, size = [], 0
            group.append(spec)
            size += nbytes
        if group:
            yield group

    shard_specs = list(groups())
    n = len(shard_specs)
    weight_map, total = {}, 0
    for k, group in enumerate(shard_specs):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, dims, kind in group:
            tensors[name] = make(name, dims, kind)
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = fname
            if progress:
                progress(name)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_processor(out: Path, arch: Arch) -> None:
    from transformers import AudioFlamingo3Processor, AutoTokenizer, MusicFlamingoProcessor, WhisperFeatureExtractor

    from .vocab import write_tokenizer

    music = arch.model_type == "musicflamingo"
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(
            Path(tmp),
            chat_template=chat_template(arch.system),
            model_max_length=arch.text_max_positions,
            renamed=SOUND_BOS_EOS if music else None,
        )
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        processor = (MusicFlamingoProcessor if music else AudioFlamingo3Processor)(
            feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
            tokenizer=tokenizer,
            chat_template=chat_template(arch.system),
            max_audio_len=arch.max_audio_len,
        )
        processor.save_pretrained(str(out))
        for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files the real repo also has
            shutil.copyfile(Path(tmp) / name, out / name)


def make_checkpoint(
    out: str | os.PathLike,
    *,
    shape: str = "tiny",
    seed: int = 0,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    think: bool = False,
    arch: str = "audioflamingo3",
) -> Path:
    """Write a random checkpoint of `shape` to `out` (atomically: temp folder, then rename); `arch`:
    audioflamingo3, musicflamingo (Music Flamingo) or afnext (Audio Flamingo Next's shape of it).
    device="cuda" draws the numbers on a GPU (the 7B shape in seconds instead of minutes); they are
    then other numbers than the CPU's for the same seed, equally deterministic."""
    from transformers import GenerationConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    spec = SHAPES[shape]
    out = Path(out).resolve()
    with staged_folder(out, force=force) as tmp:
        config_dict(spec, ARCHS[arch]).save_pretrained(str(tmp))
        if arch == "audioflamingo3":  # the file transformers' conversion script writes for audio-flamingo-3-hf
            GenerationConfig(
                bos_token_id=ENDOFTEXT_ID,
                eos_token_id=[EOS_TOKEN_ID, ENDOFTEXT_ID],
                pad_token_id=ENDOFTEXT_ID,
                do_sample=True,
                temperature=0.7,
                top_k=20,
                top_p=0.8,
                repetition_penalty=1.05,
            ).save_pretrained(str(tmp))
        else:  # Music Flamingo's and AF-Next's conversions: the tokenizer's eos and pad, 2048 new tokens
            GenerationConfig(eos_token_id=EOS_TOKEN_ID, pad_token_id=ENDOFTEXT_ID, max_new_tokens=2048).save_pretrained(
                str(tmp)
            )
        _write_processor(tmp, ARCHS[arch])
        make = lambda n, d, k: _random_tensor(n, d, k, seed, spec.dtype, device)  # noqa: E731
        _write_shards(tmp, tensor_specs(spec), make, progress)
        if think:  # AF3's think/ folder: a LoRA on the LLM + non-LoRA weights (reference/adapters.py)
            from .adapters import write_think

            write_think(tmp, seed=seed)
        meta = {"shape": shape, "seed": seed, "device": device, "arch": arch} | ({"think": True} if think else {})
        (tmp / "edge_af3_tiny.json").write_text(json.dumps(meta) + "\n")
    return out
