"""Adapters: AF3's think/ (a PEFT LoRA on the LLM + non-LoRA weights loaded with strict=False)
exported as a llama.cpp GGUF LoRA + encoder initializer overrides, switched per request on one
loaded model, against transformers + PEFT on the same checkpoint (exact mode, greedy)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_af3 import AF3, GenerationOptions, OptionsError
from edge_af3.constants import EOS_TOKEN_ID, THINK_SUFFIX
from edge_af3.errors import CheckpointError

from .conftest import noise, run_cli

GREEDY = GenerationOptions(temperature=0)
Q = "What do you hear?"


def conv(x, text):
    return [
        {
            "role": "user",
            "content": ([{"type": "audio", "audio": x}] if x is not None else []) + [{"type": "text", "text": text}],
        }
    ]


def strip_eos(ids):
    return ids[: ids.index(EOS_TOKEN_ID)] if EOS_TOKEN_ID in ids else ids


@pytest.fixture(scope="module")
def think_reference(think_ckpt):
    from edge_af3.reference.adapters import apply_adapter
    from edge_af3.reference.loader import Reference, load_reference

    ref = load_reference(think_ckpt)
    return Reference(model=apply_adapter(ref.model, think_ckpt), processor=ref.processor, path=ref.path)


@pytest.fixture(scope="module")
def plain_reference(think_ckpt):
    from edge_af3.reference.loader import load_reference

    return load_reference(think_ckpt)


@pytest.fixture(scope="module")
def model(think_bundle):
    with AF3.load(think_bundle, exact=True, options=GREEDY) as m:
        yield m


def test_think_folder_is_in_the_hf_layout_and_really_applies(think_ckpt):
    import torch

    folder = think_ckpt / "think"
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 8 and conf["lora_alpha"] == 16
    assert (folder / "adapter_model.safetensors").is_file()
    state = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    assert sorted(state) == [f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    from edge_af3.reference.loader import load_reference

    model = load_reference(think_ckpt).model
    before = model.model.multi_modal_projector.linear_1.weight.clone()
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []  # every key lands on a module ...
    assert not torch.equal(before, model.model.multi_modal_projector.linear_1.weight)  # ... and changes it


def test_bundle_carries_the_adapter_with_hashes(think_bundle):
    manifest = json.loads((think_bundle / "manifest.json").read_text())
    entry = manifest["adapters"]["think"]
    assert entry["lora"]["file"] == "adapter-think.gguf" and entry["lora"]["pairs"] == 2 * 7  # 2 layers x 7 linears
    assert entry["encoder"]["file"] == "adapter-think-encoder.npz" and len(entry["encoder"]["tensors"]) == 4
    assert entry["prompt_suffix"] == THINK_SUFFIX
    for name in ("adapter-think.gguf", "adapter-think-encoder.npz"):
        assert manifest["files"][name]["sha256"]
    with np.load(think_bundle / "adapter-think-encoder.npz", allow_pickle=False) as npz:  # no pickle in the bundle
        assert len(npz.files) == 4
    import gguf

    reader = gguf.GGUFReader(str(think_bundle / "adapter-think.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 16.0
    assert (think_bundle / "encoder.onnx").stat().st_size > 10 * (
        think_bundle / "adapter-think-encoder.npz"
    ).stat().st_size


@pytest.mark.slow
def test_think_greedy_tokens_equal_transformers_peft_then_base_again(model, think_reference, plain_reference):
    for seconds in (None, 5.0, 30.0, 47.0):
        x = None if seconds is None else noise(seconds, seed=int(seconds * 10))
        audio = None if x is None else (x, 16000)
        want = strip_eos(think_reference.generate(conv(x, Q + THINK_SUFFIX), max_new_tokens=32))
        got = model.ask(Q, audio, think=True, max_new_tokens=32)
        assert list(got.tokens) == want and got.adapter == "think", seconds
        base = model.ask(Q, audio, max_new_tokens=32)  # the same loaded model, base mode again
        assert list(base.tokens) == strip_eos(plain_reference.generate(conv(x, Q), max_new_tokens=32)), seconds
        assert base.adapter is None and base.tokens != got.tokens


def test_kv_and_rows_are_keyed_by_adapter(model):
    x = noise(3.0, seed=11)
    model.forget()
    model.ask("warm", max_new_tokens=1, think=True)  # the adapter's encoder exists from here on
    calls, think_calls = model.encoder.calls, model._variant_encoders["think"].calls
    base = model.ask(Q, (x, 16000), max_new_tokens=8)
    again = model.ask(Q, (x, 16000), max_new_tokens=8)
    assert again.timings.reused_tokens > 0 and model.encoder.calls == calls + 1  # same adapter: KV + rows reused
    think = model.ask(Q, (x, 16000), think=True, max_new_tokens=8)
    assert think.timings.reused_tokens == 0  # a prefix computed without the adapter is never reused with it
    think2 = model.ask(Q, (x, 16000), think=True, max_new_tokens=8)
    assert think2.timings.reused_tokens > 0 and think2.tokens == think.tokens
    assert model.encoder.calls == calls + 1  # the think rows came from the adapter's own encoder ...
    assert model._variant_encoders["think"].calls == think_calls + 1  # ... once, then from the cache (own key)
    after = model.ask(Q, (x, 16000), max_new_tokens=8)
    assert after.tokens == base.tokens and after.timings.reused_tokens == 0


def test_think_follow_up_in_chat_equals_the_reference_on_the_whole_conversation(model, think_reference):
    x1 = noise(2.0, seed=21)  # (transformers' processor takes one audio per conversation)
    chat = model.chat()
    first = chat.ask("Describe it.", (x1, 16000), max_new_tokens=12)  # base mode
    second = chat.ask(Q, think=True, max_new_tokens=16)  # then think: the whole conversation with the adapter
    conversation = conv(x1, "Describe it.") + [{"role": "assistant", "content": [{"type": "text", "text": first.text}]}]
    conversation += conv(None, Q + THINK_SUFFIX)
    assert list(second.tokens) == strip_eos(think_reference.generate(conversation, max_new_tokens=16))


def test_unknown_adapter_is_refused_by_name(model):
    with pytest.raises(OptionsError, match="no adapter 'nope'.*think"):
        model.ask(Q, adapter="nope")
    with pytest.raises(OptionsError, match="no adapter"):
        model.llm.activate("nope")


def _copy_adapter(think_ckpt, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(think_ckpt / "think", folder)
    return folder


def _export(think_ckpt, tmp_path, folder, **kw):
    from edge_af3.export import export

    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        shutil.copytree(think_ckpt, ckpt, ignore=shutil.ignore_patterns("think"))
    kw.setdefault("encoder_precision", "fp32")
    return export(ckpt, tmp_path / "bundle", quant="f32", verify=False, force=True, adapters={"mine": folder}, **kw)


def test_bad_adapters_are_refused_naming_the_tensor(think_ckpt, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = _copy_adapter(think_ckpt, tmp_path)
    state = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    torch.save(
        state | {"model.multi_modal_projector.linear_9.weight": torch.zeros(2)}, folder / "non_lora_trainables.bin"
    )
    with pytest.raises(CheckpointError, match="linear_9.weight matches nothing"):
        _export(think_ckpt, tmp_path, folder)
    torch.save(state | {"model.language_model.norm.weight": torch.ones(128)}, folder / "non_lora_trainables.bin")
    with pytest.raises(CheckpointError, match="LLM weight"):
        _export(think_ckpt, tmp_path, folder)
    import os

    torch.save(state | {"run": os.getcwd}, folder / "non_lora_trainables.bin")  # a pickled callable: never unpickled
    with pytest.raises(CheckpointError, match="not a plain tensor state dict"):
        _export(think_ckpt, tmp_path, folder)
    torch.save(state, folder / "non_lora_trainables.bin")
    lora = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in lora if "q_proj.lora_A" in k)
    save_file(lora | {key: torch.zeros(8, 77)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj.lora_A.weight has shape \(8, 77\)"):
        _export(think_ckpt, tmp_path, folder)
    bad = {k: v for k, v in lora.items()} | {
        "base_model.model.model.audio_tower.layers.0.fc1.lora_A.weight": torch.zeros(8, 4)
    }
    save_file(bad, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="audio_tower.layers.0.fc1.lora_A.weight does not target"):
        _export(think_ckpt, tmp_path, folder)
    save_file(lora, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="int8-quantized weight cannot take it"):
        _export(think_ckpt, tmp_path, folder, encoder_precision="int8")
    assert not (tmp_path / "bundle").exists()  # every refusal left no half bundle


def test_cli_make_tiny_think_export_adapter_and_ask(think_bundle, think_ckpt, tmp_path, speech_wav):
    res = run_cli(
        "ask", str(speech_wav), Q, "-m", str(think_bundle), "--think", "--exact", "-t", "0", "-n", "6", "--json"
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["adapter"] == "think" and out["think"] is True
    res = run_cli("doctor", "-m", str(think_bundle), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)["model"]
    assert doc["adapters"]["think"]["encoder_weights"] and doc["think"] == "think adapter + suffix"
    res = run_cli("ask", str(speech_wav), Q, "-m", str(think_bundle), "--adapter", "nope", "-n", "2")
    assert res.returncode == 1 and "no adapter 'nope'" in res.stderr and "Traceback" not in res.stderr
    folder = _copy_adapter(think_ckpt, tmp_path)
    res = run_cli(
        "export", str(think_ckpt), str(tmp_path / "b2"), "--quant", "f32", "--adapter", f"mine={folder}", "--json"
    )  # verified: each adapter against transformers + PEFT (f16 LoRA tensors, the default)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert set(manifest["adapters"]) == {"think", "mine"} and manifest["adapters"]["mine"]["prompt_suffix"] == ""
    for name in ("think", "mine"):
        check = manifest["verification"][f"adapter:{name}"]
        assert check["top1_agreement"] == 1.0 and check["kl_divergence"] < 1e-5, check
    res = run_cli("export", str(think_ckpt), str(tmp_path / "b3"), "--adapter", "mine")
    assert res.returncode != 0 and "NAME=DIR" in res.stderr


def test_server_think_per_request_on_shared_slots(think_bundle, model, tmp_path):
    """Base and think requests at once on --parallel 2: each slot decodes with its own adapter
    (one batch per adapter per step), each text equals the in-process answer."""
    import threading

    from .test_server import Server, user, wav_bytes

    clip = wav_bytes(noise(2.0, seed=31))
    want_think = model.ask(Q, (noise(2.0, seed=31), 16000), think=True, max_new_tokens=16).text
    want_base = model.ask(Q, (noise(2.0, seed=31), 16000), max_new_tokens=16).text
    srv = Server(think_bundle, "--parallel", "2", "--exact", "--decode-batching", "always", tmp_path=tmp_path, key=None)
    try:
        client = srv.client(timeout=300)
        out = {}

        def run(name, **extra):
            r = client.chat.completions.create(
                model="edge-af3", messages=[user(Q, clip)], max_tokens=16, temperature=0, extra_body=extra or None
            )
            out[name] = r.choices[0].message.content

        threads = [
            threading.Thread(target=run, args=("think",), kwargs={"think": True}),
            threading.Thread(target=run, args=("base",)),
            threading.Thread(target=run, args=("named",), kwargs={"adapter": "think"}),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert out == {"think": want_think, "base": want_base, "named": want_think}
        r = srv.post("/v1/chat/completions", json={"messages": [user(Q)], "adapter": "nope"})
        assert r.status_code == 400 and "no adapter 'nope'" in r.json()["error"]["message"]
    finally:
        srv.stop()
