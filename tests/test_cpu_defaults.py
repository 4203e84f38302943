"""The CPU defaults of #17: `--quant auto`, the mixed encoder, and where they refuse."""

from __future__ import annotations

import json

import pytest

from edge_af3.errors import OptionsError
from edge_af3.export.gate import encoder_floor
from edge_af3.quants import auto_quant, resolve_encoder_precision, resolve_quant
from edge_af3.settings import resolve

QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944}  # the real AF3's LLM
BENCH_SMALL = {"hidden_size": 896, "intermediate_size": 4864}  # Qwen2.5-0.5B's widths


def test_auto_quant_follows_the_k_quant_block_width():
    assert auto_quant(QWEN25_7B)[0] == "q4_k_m"
    quant, why = auto_quant(BENCH_SMALL)
    assert (
        quant == "iq4_nl" and "hidden (q/k/v/o, gate/up, output) 896" in why and "intermediate" not in why
    )  # 4864 = 19 x 256
    assert auto_quant({"hidden_size": 1024, "intermediate_size": 4000})[0] == "iq4_nl"  # one width is enough
    assert auto_quant({"hidden_size": 1024, "intermediate_size": 4864})[0] == "q4_k_m"
    assert resolve_quant("q8_0", BENCH_SMALL) == "q8_0" and resolve_quant("auto", None) == "q4_k_m"
    with pytest.raises(ValueError, match="unknown quant 'q3_xs'; choose one of auto, f32"):
        resolve_quant("q3_xs", QWEN25_7B)


def test_auto_quant_keeps_k_quants_where_the_widths_allow(tiny_ckpt, tmp_path):
    """What llama.cpp's quantizer does with each choice on tiny (64-wide rows): Q4_K_M falls back
    to other types for every block matrix, IQ4_NL keeps its own type."""
    import gguf

    from edge_af3.export.gguf_llm import quantize, write_gguf

    base = write_gguf(tiny_ckpt, tmp_path / "f32.gguf", ftype="f32")
    types = {}
    for quant in ("q4_k_m", "iq4_nl"):
        path = quantize(base, tmp_path / f"{quant}.gguf", quant)
        types[quant] = {
            t.tensor_type.name
            for t in gguf.GGUFReader(str(path)).tensors
            if t.name.startswith("blk.") and t.name.endswith("ffn_up.weight")
        }
    assert types["iq4_nl"] == {"IQ4_NL"} and not types["q4_k_m"] & {"Q4_K", "Q5_K", "Q6_K"}, types


def test_exact_mode_refuses_a_quantized_encoder():
    for precision in ("mixed", "int8"):
        with pytest.raises(OptionsError, match=f"exact mode needs the encoder in fp32; this bundle's is {precision}"):
            resolve(precision, device="cpu", exact=True)
    assert resolve("mixed", device="cpu").encoder_precision == "mixed"
    assert resolve("fp32", device="cpu", exact=True).kv_type == "f32"


def test_a_checkpoint_loads_through_the_auto_bundle(tiny_ckpt, tmp_path, monkeypatch, speech_wav):
    """`AF3.load(checkpoint)` exports once with the auto choices, under the name of what they picked."""
    from edge_af3 import AF3
    from edge_af3.runtime.locate import cached_bundle_path

    monkeypatch.setenv("EDGE_AF3_CACHE", str(tmp_path / "cache"))
    path = cached_bundle_path(tiny_ckpt, "auto")
    auto_enc = resolve_encoder_precision("auto")
    assert path.name.startswith(f"af3-tiny-iq4_nl-{auto_enc}-") and path == cached_bundle_path(
        tiny_ckpt, "iq4_nl", auto_enc
    )
    with AF3.load(tiny_ckpt, n_ctx=2048) as model:
        answer = model.ask("What is this?", speech_wav, max_new_tokens=4)
        assert answer.timings.audio_tokens > 0
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["llm"]["quant"], manifest["encoder"]["precision"]) == ("iq4_nl", resolve_encoder_precision("auto"))
    assert manifest["encoder"]["precision_asked"] == "auto"


def test_the_mixed_encoder_takes_the_think_adapters_projector(think_ckpt, think_bundle, tmp_path, speech_wav):
    """The think adapter's encoder weights replace the projector's float tensors, which the mixed
    graph keeps in fp32: its rows equal the fp32 bundle's think rows to the mixed graph's cosine."""
    import numpy as np

    from edge_af3 import AF3
    from edge_af3.export import export

    b = export(think_ckpt, tmp_path / "mixed", quant="f32", encoder_precision="mixed", verify=False)
    assert json.loads((b / "manifest.json").read_text())["adapters"]["think"]["encoder"]
    rows = {}
    for name, bundle in (("mixed", b), ("fp32", think_bundle)):
        with AF3.load(bundle, n_ctx=2048) as model:
            answer = model.ask("What is this?", speech_wav, think=True, max_new_tokens=2)
            assert answer.adapter == "think"
            (clip,) = model.clips(speech_wav, variant="think")
            model.encode(clip)
            rows[name] = clip.rows
    a, c = rows["mixed"].ravel(), rows["fp32"].ravel()
    cos = float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert cos >= encoder_floor("mixed"), f"think rows, mixed vs fp32: cosine {cos:.6f}"  # this CPU's floor


def test_released_pages_change_no_number(tiny_ckpt, tmp_path):
    """Dropping the mapped GGUF pages (what llama.cpp repacked) leaves every logit as it was: the
    pages still in use fault back in from the file."""
    import numpy as np

    from edge_af3.engines.llamacpp import LlamaEngine
    from edge_af3.export.gguf_llm import quantize, write_gguf

    gguf = quantize(write_gguf(tiny_ckpt, tmp_path / "f32.gguf", ftype="f32"), tmp_path / "iq4_nl.gguf", "iq4_nl")
    logits = {}
    for release in (True, False):
        with LlamaEngine(gguf, n_ctx=512, release_pages=release) as eng:
            assert (eng.released_mb > 0) == release  # Linux: the whole read-only mapping
            ids = eng.tokenize("<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
            rows = np.random.default_rng(0).standard_normal((40, eng.n_embd)).astype(np.float32)
            logits[release] = np.concatenate(
                [eng.decode_tokens(ids, logits="all"), eng.decode_embeddings(rows, logits="all")]
            )
    assert np.array_equal(logits[True], logits[False])


def test_flash_attention_is_off_on_a_cpu_and_on_with_a_gpu():
    """bench_attention: on a CPU llama.cpp's flash-attention kernel makes a question over a long
    cache 3.6x slower, so the CPU default is off; a GPU, or a q8_0 KV cache (which llama.cpp only
    runs with it), turns it on; an explicit choice wins; exact mode keeps it off."""
    from edge_af3.engines.select import EncoderChoice

    cpu = EncoderChoice("onnxruntime-cpu", "cpu")
    assert resolve("fp32", choice=cpu, llm_gpu=False).flash_attn is False
    assert resolve("fp32", choice=cpu, llm_gpu=False, kv_type="q8_0").flash_attn is True
    assert resolve("fp32", choice=cpu, llm_gpu=True).flash_attn is True
    assert resolve("fp32", choice=cpu, llm_gpu=False, flash_attn=True).flash_attn is True
    assert resolve("fp32", choice=cpu, llm_gpu=True, exact=True).flash_attn is False
