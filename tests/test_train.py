"""The reference trainer end to end on tiny: synthetic tones and spoken words -> a LoRA that
learns the labels, exported as a GGUF adapter, whose greedy tokens in the runtime equal the PEFT
model's; resumable and deterministic; bad data refused naming the line before training."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import soundfile as sf

from edge_af3 import AF3
from edge_af3.train import DataError, TrainConfig, read_examples, train

from .conftest import run_cli

PROMPT = "What is this?"


def _tone(path, freq, seconds, amp, phase):
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32), 16000)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """300 Hz tones -> "low", 1200 Hz -> "high", espeak-ng saying "yes" / "no" -> the word; the
    held-out clips are other lengths, levels, phases, speeds and pitches."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    train_lines, held = [], []
    for i in range(8):
        for freq, label in ((300, "low"), (1200, "high")):
            p = d / f"tone-{freq}-{i}.wav"
            _tone(p, freq, 1.0 + rng.random(), 0.2 + 0.3 * rng.random(), 6.28 * rng.random())
            (held if i >= 6 else train_lines).append({"audio": p.name, "prompt": PROMPT, "answer": label})
    for i, (speed, pitch) in enumerate([(120, 30), (150, 50), (180, 70), (140, 60), (165, 40)]):
        for word in ("yes", "no"):
            p = d / f"say-{word}-{i}.wav"
            subprocess.run(["espeak-ng", "-s", str(speed), "-p", str(pitch), "-w", str(p), word], check=True)
            (held if i >= 4 else train_lines).append({"audio": p.name, "prompt": PROMPT, "answer": word})
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in train_lines))
    return d, held


@pytest.fixture(scope="module")
def trained(tiny_ckpt, dataset, tmp_path_factory):
    d, _ = dataset
    out = tmp_path_factory.mktemp("run") / "adapter"
    cfg = TrainConfig(r=8, alpha=16, lr=3e-3, warmup_steps=10, batch=2, epochs=50, max_steps=120, seed=0, save_every=60)
    return train(tiny_ckpt, d / "train.jsonl", out, cfg)


def test_loss_falls_and_the_adapter_is_a_peft_folder(trained):
    losses = trained["losses"]
    assert trained["steps"] == 120 and len(losses) == 120
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:5])  # measured: ~13.7 -> ~0.5
    out = trained["out"]
    conf = json.loads(open(f"{out}/adapter_config.json").read())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16 and conf["peft_type"] == "LORA"
    assert {"checkpoint-60", "checkpoint-120"} <= {
        p.split("/")[-1] for p in map(str, __import__("pathlib").Path(out).iterdir())
    }


def test_exported_adapter_answers_like_the_peft_model_and_knows_the_labels(trained, tiny_ckpt, dataset, tmp_path):
    import torch
    from peft import PeftModel

    from edge_af3.export import export
    from edge_af3.reference.loader import Reference, load_reference

    d, held = dataset
    bundle = export(
        tiny_ckpt,
        tmp_path / "bundle",
        quant="f32",
        encoder_precision="fp32",
        verify=False,
        adapters={"taught": trained["out"]},
        adapter_type="f32",
    )
    ref = load_reference(tiny_ckpt)
    peft_ref = Reference(
        model=PeftModel.from_pretrained(ref.model, trained["out"]).eval(), processor=ref.processor, path=ref.path
    )
    with AF3.load(bundle, exact=True) as model:
        right = {"tone": 0, "say": 0}
        for ex in held:
            x, rate = sf.read(d / ex["audio"], dtype="float32")
            got = model.ask(PROMPT, str(d / ex["audio"]), adapter="taught", temperature=0, max_new_tokens=6)
            from edge_af3.audio import load_audio

            audio = load_audio(str(d / ex["audio"])).samples
            conv = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": PROMPT}]}]
            with torch.inference_mode():
                want = peft_ref.generate(conv, max_new_tokens=6)
            want = want[: want.index(151645)] if 151645 in want else want
            assert list(got.tokens) == want, ex
            right[ex["audio"].split("-")[0]] += got.text.strip() == ex["answer"]
        # tones are told apart on every held-out clip; the random-weight encoder separates espeak's
        # "yes" and "no" at unseen speeds less reliably (at least one of the two is right)
        assert right["tone"] == 4 and right["say"] >= 1, right
        base = model.ask(PROMPT, str(d / held[0]["audio"]), temperature=0, max_new_tokens=6)
        assert base.text.strip() != held[0]["answer"]  # the base model never learnt it


def test_resumed_run_equals_an_uninterrupted_one(tiny_ckpt, dataset, tmp_path):
    d, _ = dataset
    cfg = dict(r=4, alpha=8, lr=1e-3, batch=2, epochs=5, seed=3, save_every=3)
    whole = train(tiny_ckpt, d / "train.jsonl", tmp_path / "a", TrainConfig(max_steps=6, **cfg))
    train(tiny_ckpt, d / "train.jsonl", tmp_path / "b", TrainConfig(max_steps=3, **cfg))
    resumed = train(tiny_ckpt, d / "train.jsonl", tmp_path / "b", TrainConfig(max_steps=6, **cfg), resume=True)
    assert resumed["losses"] == whole["losses"]
    from safetensors.numpy import load_file

    a, b = (
        load_file(str(tmp_path / "a" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "b" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="not empty"):
        train(tiny_ckpt, d / "train.jsonl", tmp_path / "a", TrainConfig(max_steps=6, **cfg))


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "train.jsonl:2: not JSON"),
        ('{"audio": "missing.wav", "prompt": "q", "answer": "a"}', "train.jsonl:2: audio file missing.wav not found"),
        (
            '{"audio": "ok.wav", "prompt": "q", "answer": "  "}',
            "train.jsonl:2: every assistant answer must be non-empty",
        ),
        ('{"audio": "ok.wav", "answer": "a"}', "train.jsonl:2: needs 'prompt'"),
        ('{"audio": "text.wav", "prompt": "q", "answer": "a"}', "train.jsonl:2: .*text.wav: not a readable audio file"),
        ('{"messages": [{"role": "assistant", "content": "hi", "audio": "ok.wav"}]}', "only user messages carry audio"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be the assistant's answer"),
    ],
)
def test_bad_data_is_refused_naming_the_line(tmp_path, line, message):
    _tone(tmp_path / "ok.wav", 440, 1.0, 0.3, 0.0)
    (tmp_path / "text.wav").write_text("not audio")
    data = tmp_path / "train.jsonl"
    data.write_text('{"audio": "ok.wav", "prompt": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_examples(data)


def test_cli_train_refuses_bad_data_in_one_line_before_loading(tiny_ckpt, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "answer": "a"}\n{oops\n')
    res = run_cli("train", str(tiny_ckpt), str(tmp_path / "d.jsonl"), str(tmp_path / "out"))
    assert res.returncode == 1 and "d.jsonl:2: not JSON" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    res = run_cli("train", str(tiny_ckpt), str(tmp_path / "d.jsonl"), str(tmp_path / "out"), "--targets", "q,zz")
    assert res.returncode == 1 and "unknown LoRA target" in res.stderr
