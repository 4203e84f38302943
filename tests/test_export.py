"""Exporters: ONNX encoder and GGUF LLM against the transformers reference; refusals; atomicity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from edge_af3.bundle import BundleError, open_bundle
from edge_af3.engines.llamacpp import LlamaEngine
from edge_af3.export import export
from edge_af3.export.gate import encoder_floor
from edge_af3.features import extract_features
from edge_af3.quants import resolve_encoder_precision
from edge_af3.reference.loader import CheckpointError

from .conftest import noise, run_cli


@pytest.fixture(scope="session")
def bundle_f32(tiny_ckpt, tmp_path_factory):
    return export(tiny_ckpt, tmp_path_factory.mktemp("bundles") / "f32", quant="f32", encoder_precision="fp32")


def rows(session, feats):
    out = session.run(None, {"input_features": feats.features, "input_features_mask": feats.mask})[0]
    return np.concatenate([out[w, :n] for w, n in enumerate(feats.rows_per_window)])


def reference_rows(reference, feats):
    r = reference.audio_rows(feats.features, feats.mask)
    return np.concatenate([r[w, :n] for w, n in enumerate(feats.rows_per_window)])


def test_onnx_fp32_matches_reference(bundle_f32, reference):
    sess = ort.InferenceSession(str(bundle_f32 / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for seconds in (0.5, 10.0, 45.0):
        feats = extract_features((noise(seconds, seed=7), 16000))
        got, want = rows(sess, feats), reference_rows(reference, feats)
        assert got.shape == want.shape == (feats.n_tokens, 64)
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("precision", ["fp16", "int8", "mixed"])
def test_onnx_reduced_precision(tiny_ckpt, tmp_path, reference, precision):
    min_cos = encoder_floor(precision)  # the parity gate's floor on this CPU (int8 dot product or not)
    b = export(tiny_ckpt, tmp_path / precision, quant="q8_0", encoder_precision=precision, verify=False)
    sess = ort.InferenceSession(str(b / "encoder.onnx"), providers=["CPUExecutionProvider"])
    feats = extract_features((noise(20.0, seed=9), 16000))
    got, want = rows(sess, feats).ravel(), reference_rows(reference, feats).ravel()
    assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) >= min_cos


def test_encoder_graphs_attention_layouts(tiny_ckpt, tmp_path, reference, monkeypatch):
    """mixed: int8 on each layer's fc1 only, attention one head at a time (tiny: 4 layers x 2 heads).
    fp32: per-head when exported without a CUDA GPU, batched (the form GPU builders fuse) with one
    or when asked; both layouts give transformers' rows, and the manifest says which it holds."""
    import onnx

    from edge_af3.engines import select

    ops, got, bundles = {}, {}, {}
    feats = extract_features((noise(20.0, seed=9), 16000))
    for tag, precision, attention, gpu in (
        ("mixed", "mixed", "auto", None),
        ("fp32", "fp32", "auto", None),
        ("fp32-batched", "fp32", "batched", None),
        ("fp32-gpu", "fp32", "auto", "NVIDIA H100 80GB HBM3"),  # an exporter with a CUDA GPU
    ):
        monkeypatch.setattr(select, "gpu_name", lambda gpu=gpu: gpu)
        bundles[tag] = b = export(
            tiny_ckpt,
            tmp_path / tag,
            quant="q8_0",
            encoder_precision=precision,
            encoder_attention=attention,
            verify=False,
        )
        nodes = onnx.load(str(b / "encoder.onnx")).graph.node
        ops[tag] = {op: [n.name for n in nodes if n.op_type == op] for op in ("MatMulInteger", "Softmax")}
        enc = open_bundle(b).manifest["encoder"]
        assert enc["precision"] == precision
        assert enc["attention"] == ("per-head" if tag in ("mixed", "fp32") else "batched")
        sess = ort.InferenceSession(str(b / "encoder.onnx"), providers=["CPUExecutionProvider"])
        got[tag] = rows(sess, feats)
    assert len(ops["mixed"]["MatMulInteger"]) == 4 and all("/fc1/" in n for n in ops["mixed"]["MatMulInteger"])
    softmax = {tag: len(o["Softmax"]) for tag, o in ops.items()}
    assert softmax == {"mixed": 8, "fp32": 8, "fp32-batched": 4, "fp32-gpu": 4}
    assert ops["fp32"]["MatMulInteger"] == ops["fp32-batched"]["MatMulInteger"] == []
    want = reference_rows(reference, feats)
    for tag in ("fp32", "fp32-batched", "fp32-gpu"):
        assert np.abs(got[tag] - want).max() <= 1e-4, tag
    assert np.abs(got["fp32"] - got["fp32-batched"]).max() <= 1e-5  # the same arithmetic, head by head

    # the memory plan follows the manifest: one head's scores per window (3 x 1500^2 floats) for a
    # per-head graph, all heads' for a batched one; a manifest from before `attention` was recorded
    # counts fp32 as batched, as it was then
    from edge_af3.plan import plan

    def activations(bundle):
        return plan(bundle, encoder_precision="fp32", windows_per_run=1)["items"]["encoder activations (est.)"]

    per_head, batched = activations(bundles["fp32"]), activations(bundles["fp32-batched"])
    assert batched - per_head == 20 * 1500 * 1500 * 4 // 2 - 3 * 1500 * 1500 * 4
    old = tmp_path / "old"
    shutil.copytree(bundles["fp32"], old)
    m = json.loads((old / "manifest.json").read_text())
    del m["encoder"]["attention"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert activations(old) == batched


def test_encoder_attention_auto_follows_the_target(monkeypatch):
    from edge_af3.engines import select
    from edge_af3.errors import OptionsError
    from edge_af3.quants import resolve_encoder_attention

    for gpu, want in ((None, "per-head"), ("NVIDIA H100", "batched")):
        monkeypatch.setattr(select, "gpu_name", lambda gpu=gpu: gpu)
        assert resolve_encoder_attention("auto", "fp32") == want
        assert resolve_encoder_attention("auto", "fp16") == "batched"
        assert resolve_encoder_attention("auto", "mixed") == resolve_encoder_attention("auto", "int8") == "per-head"
        assert resolve_encoder_attention("batched", "mixed") == "batched"  # asked for: taken as asked
    with pytest.raises(OptionsError, match="unknown encoder attention 'heads'; choose auto or one of per-head"):
        resolve_encoder_attention("heads", "fp32")


def test_gguf_f32_logits_match_reference(bundle_f32, reference):
    conv = [{"role": "user", "content": [{"type": "text", "text": "What is in this recording? Answer briefly."}]}]
    ids = reference.inputs(conv)["input_ids"][0].tolist()
    want = reference.logits(conv)
    with LlamaEngine(bundle_f32 / "llm-f32.gguf", n_ctx=256, n_batch=8, kv_type="f32", flash_attn=False) as eng:
        got = eng.decode_tokens(ids, logits="all")  # several n_batch chunks
    assert np.abs(got - want).max() <= 1e-3


CORPUS = [
    "Hello world",
    " leading space",
    "ASCII: the quick brown fox jumps over 13 lazy dogs!",
    "Accents: déjà vu, naïve café, Ångström, Ünïcödé",
    "CJK: 你好，世界。日本語のテキスト。한국어 문장",
    "Emoji: 🦙🎵🔊 👩‍👩‍👧",
    "Code:\n```python\ndef f(x):\n\treturn {'a': x**2}  # comment\n```",
    "Numbers 1234567890 and 3.14159e-10",
    "Mixed\r\nline\n\n\nbreaks   and\ttabs",
    "",
]


def test_gguf_tokenization_identical(bundle_f32, reference):
    from edge_af3.reference.vocab import SPECIAL_TOKENS

    tok = reference.processor.tokenizer
    specials = "".join(c for c, _ in SPECIAL_TOKENS)
    texts = CORPUS + [specials, f"<|im_start|>user\n<sound>{CORPUS[4]}<|im_end|>\n"]
    with LlamaEngine(bundle_f32 / "llm-f32.gguf", n_ctx=64) as eng:
        for text in texts:
            assert eng.tokenize(text) == tok(text, add_special_tokens=False).input_ids, repr(text)
        ids = tok(CORPUS[5], add_special_tokens=False).input_ids
        assert b"".join(eng.piece(i) for i in ids).decode() == CORPUS[5]


def test_manifest_and_bundle_checks(bundle_f32, tmp_path):
    m = json.loads((bundle_f32 / "manifest.json").read_text())
    assert m["special_ids"]["sound"] == 151669 and m["llm"]["quant"] == "f32"
    assert set(m["files"]) == {"encoder.onnx", "llm-f32.gguf"}
    assert m["verification"]["encoder"]["max_abs_diff"] <= 1e-4
    assert m["verification"]["llm"]["max_abs_diff"] <= 1e-3
    assert m["verification"]["llm"]["tokenization_identical"] is True
    assert "model.safetensors" in m["source"]["files"]
    assert tuple(int(v) for v in m["exporter"]["transformers"].split(".")[:2]) >= (5, 5)
    assert open_bundle(bundle_f32).llm.name == "llm-f32.gguf"
    broken = tmp_path / "broken"
    shutil.copytree(bundle_f32, broken)
    with open(broken / "encoder.onnx", "r+b") as f:  # same size, one byte changed
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(broken)
    (broken / "llm-f32.gguf").unlink()
    with pytest.raises(BundleError, match="missing"):
        open_bundle(broken)
    with pytest.raises(BundleError, match="not an edge-af3 bundle"):
        open_bundle(tmp_path)


def test_quantized_exports_report_agreement(tiny_ckpt, tmp_path):
    # (top-1 at least, KL at most) vs the fp32 reference; measured on this seed-0 checkpoint:
    # f16 1.000 / 1.9e-6, q8_0 0.942 / 1.4e-3, q4_k_m 0.865 / 0.040, q4_0 0.635 / 0.149. A quantizer
    # that scrambled or zeroed a tensor lands near top-1 0 with a KL of several nats.
    bounds = {"f16": (0.99, 1e-4), "q8_0": (0.9, 0.01), "q4_k_m": (0.75, 0.1), "q4_0": (0.5, 0.4)}
    kl = {}
    for quant, (top1, max_kl) in bounds.items():
        b = export(tiny_ckpt, tmp_path / quant, quant=quant)
        v = json.loads((b / "manifest.json").read_text())["verification"]["llm"]
        assert (b / f"llm-{quant}.gguf").is_file() and v["tokenization_identical"]
        assert v["top1_agreement"] >= top1 and v["kl_divergence"] <= max_kl, (quant, v)
        kl[quant] = v["kl_divergence"]
    assert kl["f16"] < kl["q8_0"] < kl["q4_k_m"] < kl["q4_0"]  # fewer bits, further from the reference


def test_refusals(tiny_ckpt, tmp_path):
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    for src in (qwen, whisper):
        with pytest.raises(CheckpointError, match="not an Audio Flamingo checkpoint"):
            export(src, tmp_path / "o1")
    noshard = tmp_path / "noshard"
    shutil.copytree(tiny_ckpt, noshard)
    (noshard / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        export(noshard, tmp_path / "o2")
    with pytest.raises(ValueError, match="unknown quant"):
        export(tiny_ckpt, tmp_path / "o3", quant="q3_xs")
    with pytest.raises(ValueError, match="unknown encoder attention 'flash'"):
        export(tiny_ckpt, tmp_path / "o3", encoder_attention="flash")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        export(tiny_ckpt, tmp_path / "exists")
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_failed_export_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import edge_af3.export as ex

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "write_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_ckpt, tmp_path / "bundle", quant="f32", verify=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_subprocess(tiny_ckpt, tmp_path):
    res = run_cli(
        "export", str(tiny_ckpt), str(tmp_path / "b"), "--quant", "q8_0", "--encoder-precision", "fp32", "--json"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    assert info["verification"]["encoder"]["max_abs_diff"] <= 1e-4
    # the defaults: --quant auto (tiny's 64-wide rows: iq4_nl); the encoder this machine's `auto` picks
    # (mixed on a CPU with VNNI and no CUDA GPU, else fp32)
    res = run_cli("export", str(tiny_ckpt), str(tmp_path / "auto"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    auto_enc = resolve_encoder_precision("auto")
    assert (m["llm"]["quant"], m["llm"]["quant_asked"], m["encoder"]["precision"]) == ("iq4_nl", "auto", auto_enc)
    assert (tmp_path / "auto" / "llm-iq4_nl.gguf").is_file() and "not a multiple of 256" in m["llm"]["quant_why"]
    assert m["verification"]["encoder"]["cosine"] >= encoder_floor(auto_enc)
    assert m["parity_gate"] == {"verified": True, "passed": True, "accepted": False, "failures": []}
    assert "--quant auto: iq4_nl" in res.stderr and "Please consider" not in res.stderr
    assert f"--encoder-attention auto: {m['encoder']['attention']}" in res.stderr
    res = run_cli("export", str(tiny_ckpt), str(tmp_path / "b"))
    assert res.returncode == 1 and "exists" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("export", str(tiny_ckpt), str(tmp_path / "c"), "--quant", "bogus")
    assert res.returncode == 1 and "unknown quant" in res.stderr
    res = run_cli("export", str(tiny_ckpt), str(tmp_path / "c"), "--encoder-attention", "flash")
    assert res.returncode == 1 and "unknown encoder attention 'flash'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "c").exists()


def test_mmproj_runs_in_llama_cpp(tiny_ckpt, tmp_path, reference):
    """`--mmproj` writes a file stock llama.cpp (libmtmd) loads; on a full 30 s window, where llama.cpp's
    audio path agrees with the model, its rows match the reference's."""
    from edge_af3.engines.mtmd import MARKER, MtmdAudio

    b = export(tiny_ckpt, tmp_path / "b", quant="q8_0", encoder_precision="fp32", mmproj=True)
    m = json.loads((b / "manifest.json").read_text())
    assert m["mmproj"]["file"] == "mmproj-f16.gguf" and "mmproj-f16.gguf" in m["files"]
    assert m["verification"]["mmproj"]["cosine"] >= 0.999
    clip = noise(30.0, seed=3)
    feats = extract_features((clip, 16000))
    want = reference_rows(reference, feats)
    with LlamaEngine(b / "llm-q8_0.gguf", n_ctx=4096) as eng, MtmdAudio(b / "mmproj-f16.gguf", eng) as mt:
        got = mt.audio_rows(clip)
        # llama.cpp's known AF3 deviations (docs/architecture.md): an extra window at exactly 30 s,
        # and no padding mask, so a 5 s clip costs a whole window
        assert got.shape == (1500, 64) and mt.audio_rows(clip[: 5 * 16000]).shape == (750, 64)
        cos = float((got[:750] * want).sum() / (np.linalg.norm(got[:750]) * np.linalg.norm(want)))
        assert cos >= 0.999
        info = mt.prefill(f"<|im_start|>user\n{MARKER}What is this?<|im_end|>\n<|im_start|>assistant\n", [clip[:80000]])
        assert info["audio_tokens"] == 750 and eng.n_past == info["tokens"]
        assert np.isfinite(eng.last_logits()).all()


def test_large_encoder_goes_to_one_data_file(tiny_ckpt, tmp_path, reference, monkeypatch):
    import edge_af3.export.onnx_encoder as oe

    monkeypatch.setattr(oe, "EXTERNAL_BYTES", 0)  # take the >2 GB path on the tiny model
    feats = extract_features((noise(12.0, seed=5), 16000))
    for precision in ("fp32", "mixed"):
        b = export(tiny_ckpt, tmp_path / precision, quant="q8_0", encoder_precision=precision, verify=False)
        assert sorted(p.name for p in b.iterdir()) == [
            "encoder.onnx",
            "encoder.onnx.data",
            "llm-q8_0.gguf",
            "manifest.json",
        ]
        assert (b / "encoder.onnx").stat().st_size < 200_000 < (b / "encoder.onnx.data").stat().st_size
        assert "encoder.onnx.data" in open_bundle(b).manifest["files"]
        sess = ort.InferenceSession(str(b / "encoder.onnx"), providers=["CPUExecutionProvider"])
        got, want = rows(sess, feats), reference_rows(reference, feats)
        if precision == "fp32":
            assert np.abs(got - want).max() <= 1e-4
        else:
            assert got.ravel() @ want.ravel() / (np.linalg.norm(got) * np.linalg.norm(want)) >= encoder_floor("mixed")


def test_onnx_write_replaces_a_stale_data_file(tmp_path):
    """onnx appends external data to an existing file: `onnx_tools.write` starts it afresh, and an
    inline save leaves no `.data` behind."""
    import onnx
    from onnx import helper, numpy_helper

    from edge_af3.onnx_tools import write

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
            initializer=[numpy_helper.from_array(w, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    dst, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    sizes = []
    for _ in range(2):
        write(onnx.load_from_string(model.SerializeToString()), dst, external=True)
        sizes.append(data.stat().st_size)
    assert sizes == [w.nbytes, w.nbytes]
    x = np.ones((1, 64), np.float32)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(None, {"x": x})[0], x @ w)
    write(model, dst, external=False)
    assert not data.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
