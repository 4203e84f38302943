"""Test checkpoints and the reference loader: real layout, real vocabulary, clear refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edge_af3.constants import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, SOUND_TOKEN_ID, VOCAB_SIZE
from edge_af3.reference.loader import CheckpointError, load_reference, read_config, resolve_checkpoint
from edge_af3.reference.tiny import SHAPES, make_checkpoint, tensor_specs


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_layout_and_loading(reference, tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    for required in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "processor_config.json",
    ]:
        assert required in names, required
    model = reference.model
    assert type(model).__name__ == "AudioFlamingo3ForConditionalGeneration"
    assert model.config.audio_token_id == SOUND_TOKEN_ID
    # every on-disk tensor lands in the model, none left over (strict load)
    from safetensors import safe_open

    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert on_disk == {n for n, _, _ in tensor_specs(SHAPES["tiny"])}
    assert len(model.state_dict()) == len(on_disk)
    w = model.model.audio_tower.layers[0].self_attn.k_proj
    assert w.bias is None  # AF-Whisper's k projection has no bias


def test_special_ids_are_the_real_ones(reference):
    tok = reference.processor.tokenizer
    assert len(tok) == VOCAB_SIZE
    assert tok.convert_tokens_to_ids("<sound>") == SOUND_TOKEN_ID
    assert tok.convert_tokens_to_ids("<|im_end|>") == EOS_TOKEN_ID
    assert tok.convert_ids_to_tokens([BOS_TOKEN_ID, PAD_TOKEN_ID]) == ["[BOS]", "[PAD]"]
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert reference.processor.audio_token_id == SOUND_TOKEN_ID


def test_tokenizer_matches_llama_cpp_test_vectors(reference):
    """llama.cpp ships tokenisation vectors for its Qwen2 vocabulary; our HF tokenizer must agree."""
    sdist = os.environ.get("EDGE_AF3_LLAMA_SDIST")
    assert sdist, "EDGE_AF3_LLAMA_SDIST must point at the llama-cpp-python sdist (scripts/setup.sh keeps it)"
    base = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
    with tarfile.open(sdist) as tar:
        inp = tar.extractfile(base + ".inp").read().decode()
        outp = tar.extractfile(base + ".out").read().decode()
    texts = inp.split("\n__ggml_vocab_test__\n")
    expected = outp.split("\n")
    tok = reference.processor.tokenizer
    assert len(texts) >= 30
    for i, text in enumerate(texts):
        if i == len(texts) - 1:
            text = text.removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
        want = [int(t) for t in expected[i].split()]
        assert tok(text, add_special_tokens=False).input_ids == want, repr(text)


def test_chat_template_expands_sound(reference):
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": np.zeros(16000, np.float32)},
                {"type": "text", "text": "What do you hear?"},
            ],
        }
    ]
    batch = reference.inputs(conv)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(SOUND_TOKEN_ID) == 25
    text = reference.processor.tokenizer.decode([i for i in ids if i != SOUND_TOKEN_ID])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat do you hear?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_several_clips_are_assembled_as_the_processor_assembles_one(reference):
    """transformers' AF3 processor refuses several clips in one conversation (voice chat has one
    per turn); the reference assembles them from the processor's own pieces. With one clip that
    assembly equals the processor's output exactly; with two, each clip's run of <sound> ids and
    windows stand in prompt order."""
    import torch

    rng = np.random.default_rng(1)
    a = (0.1 * rng.standard_normal(3 * 16000)).astype(np.float32)
    b = (0.1 * rng.standard_normal(40 * 16000)).astype(np.float32)
    one = [{"role": "user", "content": [{"type": "audio", "audio": a}, {"type": "text", "text": "Hi"}]}]
    want = reference.inputs(one)
    got = reference._multi_audio_inputs(one, [a], True)
    for key in ("input_ids", "attention_mask", "input_features", "input_features_mask"):
        assert torch.equal(want[key], got[key]), key
    two = one + [
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "audio", "audio": b}]},
    ]
    batch = reference.inputs(two)
    ids = batch["input_ids"][0].tolist()
    first = ids.index(SOUND_TOKEN_ID)
    assert ids[first : first + 75] == [SOUND_TOKEN_ID] * 75 and ids.count(SOUND_TOKEN_ID) == 75 + 1000
    assert batch["input_features"].shape[0] == 1 + 2  # 3 s: one window; 40 s: two
    assert torch.equal(batch["input_features"][:1], want["input_features"])


def test_reference_generate_is_deterministic(reference):
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    a = reference.generate(conv, max_new_tokens=8)
    b = reference.generate(conv, max_new_tokens=8)
    assert a == b and len(a) >= 1


def test_same_seed_same_bytes(tmp_path, tiny_ckpt):
    again = make_checkpoint(tmp_path / "again", shape="tiny", seed=0)
    other = make_checkpoint(tmp_path / "other", shape="tiny", seed=1)
    assert digest(again) == digest(tiny_ckpt)
    d_other = digest(other)
    assert d_other["model.safetensors"] != digest(tiny_ckpt)["model.safetensors"]
    assert d_other["tokenizer.json"] == digest(tiny_ckpt)["tokenizer.json"]


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    target.mkdir()
    with pytest.raises(FileExistsError):
        make_checkpoint(target, shape="tiny")
    with pytest.raises(ValueError, match="unknown shape"):
        make_checkpoint(tmp_path / "x", shape="huge")
    from edge_af3.reference import tiny

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_write_shards", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        make_checkpoint(tmp_path / "half", shape="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_not_af3_is_refused(tmp_path, tiny_ckpt):
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    for path, kind in [(qwen, "qwen2"), (whisper, "whisper")]:
        with pytest.raises(CheckpointError, match=f"model_type is '{kind}'"):
            load_reference(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(empty)
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_checkpoint(tmp_path / "missing")


def test_missing_shard_is_refused(tmp_path, tiny_ckpt):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_reference(broken)
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing weight shard"):
        load_reference(broken)


def test_hub_id_from_offline_cache(tmp_path, tiny_ckpt):
    """A pre-populated Hub cache (the layout huggingface_hub writes) works with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--nvidia--audio-flamingo-3-hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_ckpt.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from edge_af3.reference.loader import load_reference\n"
        "ref = load_reference('nvidia/audio-flamingo-3-hf')\n"
        "print(ref.path)\n"
        "print(ref.generate([{'role': 'user', 'content': [{'type': 'text', 'text': 'Hi'}]}], max_new_tokens=4))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[0] == str(snap)
    # an id that is not cached fails clearly, offline
    code = "from edge_af3.reference.loader import resolve_checkpoint\nresolve_checkpoint('nvidia/not-there')\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0 and "not in the local Hub cache" in res.stderr
