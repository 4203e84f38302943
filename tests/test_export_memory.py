"""Export in bounded memory: the pieces that let a 16 GB machine export the 7B, each against the
thing it replaces — the streamed LLM reference against transformers' whole model (and PEFT), the
plain-read safetensors reader against safetensors itself, the meta-built encoder against the model's
own audio tower. The full-shape figures come from benchmarks/bench_export_memory.py."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_af3.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CONV = [{"role": "user", "content": [{"type": "text", "text": "Describe the sound in one sentence. 数字 42 🦙"}]}]


def _ids(reference) -> list[int]:
    return reference.inputs(CONV)["input_ids"][0].tolist()


def test_streamed_llm_is_the_whole_model(tiny_ckpt, reference):
    from edge_af3.reference.streamed import StreamedLLM

    llm = StreamedLLM(tiny_ckpt)
    seen = []

    def count(module, args):  # after our loader: what the whole model holds while this part runs
        seen.append(sum(p.numel() for p in llm.model.parameters() if not p.is_meta))

    parts = [llm.model.model.embed_tokens, *llm.model.model.layers, llm.model.model.norm, llm.model.lm_head]
    for part in parts:
        part.register_forward_pre_hook(count)
    got = llm.logits(_ids(reference))
    want = reference.logits(CONV)
    assert got.shape == want.shape and np.array_equal(got, want)  # the same arithmetic on the same weights
    # one part at a time, never the model: each count is that part's own size, and nothing stays
    sizes = [sum(p.numel() for p in part.parameters()) for part in parts]
    assert seen == sizes and len(seen) == len(parts)
    assert all(p.is_meta for p in llm.model.parameters())


def test_streamed_llm_with_lora_is_peft(think_ckpt, tmp_path):
    from edge_af3.reference.adapters import apply_adapter
    from edge_af3.reference.loader import Reference, load_reference
    from edge_af3.reference.streamed import StreamedLLM

    base = load_reference(think_ckpt)
    ids = _ids(base)
    without = base.logits(CONV)
    peft = Reference(apply_adapter(base.model, think_ckpt, "think"), base.processor, base.path).logits(CONV)
    got = StreamedLLM(think_ckpt, adapter=think_ckpt / "think").logits(ids)
    assert np.abs(peft - without).max() > 1.0  # the adapter moves the logits a lot...
    np.testing.assert_allclose(got, peft, atol=1e-4, rtol=0)  # ...and the merged layers move them as PEFT does
    # rsLoRA scales by alpha / sqrt(r) (5.66 here) instead of alpha / r (2): PEFT reads the flag itself
    rs = tmp_path / "think-rs"
    shutil.copytree(think_ckpt / "think", rs)
    conf = json.loads((rs / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps(conf | {"use_rslora": True}))
    base = load_reference(think_ckpt)
    peft_rs = Reference(apply_adapter(base.model, think_ckpt, "think", rs), base.processor, base.path).logits(CONV)
    assert np.abs(peft_rs - peft).max() > 1.0
    np.testing.assert_allclose(StreamedLLM(think_ckpt, adapter=rs).logits(ids), peft_rs, atol=1e-4, rtol=0)


def test_shard_reader_matches_safetensors(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    from edge_af3.checkpoint import weight_files
    from edge_af3.export.tensors import Shard

    for f in weight_files(tiny_ckpt):
        want = load_file(str(f))
        shard = Shard(f)
        assert sorted(shard.keys()) == sorted(want)
        for name, tensor in want.items():
            got = shard.get(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name
    # a malformed file is one clear error, never a crash or a tensor read from the wrong bytes
    src = weight_files(tiny_ckpt)[0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src[: len(src) // 2])
    with pytest.raises(CheckpointError, match="past the file's end"):
        Shard(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Shard(junk)

    def write(name, table, data=b"\0" * 4):
        header = json.dumps(table).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(header)) + header + data)
        return tmp_path / name

    odd = Shard(write("odd.safetensors", {"x": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}))
    with pytest.raises(CheckpointError, match="does not take"):  # refused when read, not when listed
        odd.get("x")
    with pytest.raises(CheckpointError, match="4 bytes for its shape"):
        Shard(write("short.safetensors", {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}))
    with pytest.raises(CheckpointError, match="malformed"):
        Shard(write("bad.safetensors", {"x": {"dtype": "F32", "shape": [1], "data_offsets": "zero"}}))
    with pytest.raises(CheckpointError, match="not a table"):
        Shard(write("list.safetensors", [1, 2]))


def test_meta_built_encoder_is_the_models_tower(tiny_ckpt, reference):
    from edge_af3.export.onnx_encoder import load_encoder

    wrapper = load_encoder(tiny_ckpt)
    assert not any(t.is_meta for t in list(wrapper.parameters()) + list(wrapper.buffers()))
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((1, 128, 3000)).astype(np.float32)
    mask = np.ones((1, 3000), np.int64)
    with torch.inference_mode():
        got = wrapper(torch.from_numpy(feats), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, reference.audio_rows(feats, mask), atol=1e-5, rtol=0)


def test_mixed_quantization_of_the_fc1_matmuls_alone_is_the_whole_graph_run(tiny_ckpt, tmp_path):
    """ONNX Runtime's quantizer on the whole traced graph (what the export ran before, holding the
    graph's weights three times) and on the fc1 matmuls alone, spliced back: the same graph."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edge_af3.export.onnx_encoder import MIXED_NODES, load_encoder, quantize_mixed, trace_encoder

    wrapper = load_encoder(tiny_ckpt)
    raw, (_, n_layers) = trace_encoder(wrapper, tmp_path, precision="mixed")
    names = [n.name for n in onnx.load(str(raw)).graph.node if n.op_type == "MatMul" and MIXED_NODES.search(n.name)]
    whole = tmp_path / "whole.onnx"
    quantize_dynamic(str(raw), str(whole), weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=names)
    ours = quantize_mixed(raw, tmp_path / "ours.onnx", n_layers=n_layers, external=False)
    a, b = onnx.load(str(whole)).graph, onnx.load(str(ours)).graph
    nodes = lambda g: sorted((n.op_type, tuple(n.input), tuple(n.output)) for n in g.node)  # noqa: E731
    assert nodes(a) == nodes(b)  # the same nodes (ONNX Runtime re-sorts the whole graph; order aside)
    wa = {t.name: numpy_helper.to_array(t) for t in a.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert sum(n.op_type == "MatMulInteger" for n in b.node) == n_layers
    feed = {
        "input_features": np.random.default_rng(5).standard_normal((1, 128, 3000)).astype(np.float32),
        "input_features_mask": np.ones((1, 3000), np.int64),
    }
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    assert np.array_equal(run(whole), run(ours))


def test_first_use_states_the_measured_export_peak():
    """The RAM `first_use` / `models pull` announce for the 7B is the benchmark's measured peak (a
    little above it), not a guess: the figure moves with the results file."""
    from edge_af3.runtime.locate import export_ram_bytes

    root = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "epyc-zen4-avx512"
    report = json.loads((root / "export-memory-full-q4_k_m.json").read_text())
    run = report["runs"]["after"]
    peak = run["summary"]["all"]["peak_rss_mb"] * 2**20
    stated = export_ram_bytes(report["checkpoint_bytes"], report["quant"])
    assert run["returncode"] == 0 and peak <= stated <= 1.15 * peak
    assert export_ram_bytes(report["checkpoint_bytes"], "f32") > 2 * stated  # --exact checks an F32 GGUF


def test_streamed_llm_on_bf16_weights_is_the_whole_model(tmp_path):
    """AF3's own on-disk type: bf16 tensors read by the plain reader, widened to float32 part by
    part, give the whole float32 reference's logits exactly (and the reader gives safetensors' own
    bf16 tensors)."""
    from safetensors.torch import load_file

    from edge_af3.checkpoint import weight_files
    from edge_af3.export.tensors import Shard
    from edge_af3.reference.loader import load_reference
    from edge_af3.reference.streamed import StreamedLLM
    from edge_af3.reference.tiny import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "k256", shape="tiny-k256", seed=0)
    f = weight_files(ckpt)[0]
    want = load_file(str(f))
    assert {t.dtype for t in want.values()} == {torch.bfloat16}
    assert all(torch.equal(Shard(f).get(k), v) for k, v in want.items())
    ref = load_reference(ckpt)
    assert np.array_equal(StreamedLLM(ckpt).logits(_ids(ref)), ref.logits(CONV))


def test_a_checkpoint_without_its_lm_head_is_refused(tiny_ckpt, tmp_path):
    """A checkpoint with no lm_head tensor, its config saying `tie_word_embeddings` (as the smaller
    Qwen2.5 models ship): transformers' AudioFlamingo3 model does not tie its head to the embedding,
    it starts it at random — shown here, so this test fails the day transformers ties it and the
    exporter should follow. The exporter, the GGUF writer and the streamed reference refuse it,
    before anything is written."""
    from safetensors.numpy import load_file, save_file

    from edge_af3.export import export
    from edge_af3.export.gguf_llm import write_gguf
    from edge_af3.reference.loader import load_reference
    from edge_af3.reference.streamed import StreamedLLM

    ckpt = tmp_path / "tied"
    shutil.copytree(tiny_ckpt, ckpt)
    (shard,) = ckpt.glob("*.safetensors")
    tensors = load_file(str(shard))
    del tensors["language_model.lm_head.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))

    ref = load_reference(ckpt)
    head, embed = ref.model.get_output_embeddings().weight, ref.model.get_input_embeddings().weight
    assert head.shape == embed.shape and not torch.equal(head, embed)  # untied: a head made up at load

    why = "no LM head weight.*tie_word_embeddings.*no defined output layer"
    with pytest.raises(CheckpointError, match=why):
        export(ckpt, tmp_path / "bundle", quant="f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tied"]
    with pytest.raises(CheckpointError, match=why):
        write_gguf(ckpt, tmp_path / "llm.gguf", ftype="f32")
    assert not (tmp_path / "llm.gguf").exists()
    with pytest.raises(CheckpointError, match=why):
        StreamedLLM(ckpt)
    del cfg["text_config"]["tie_word_embeddings"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"no LM head weight \(lm_head.weight\)$"):
        export(ckpt, tmp_path / "bundle", quant="f32")
