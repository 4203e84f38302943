"""Music Flamingo / Audio Flamingo Next checkpoints (model type musicflamingo) against transformers'
`MusicFlamingoForConditionalGeneration` on tiny random checkpoints: the rows' times, token
counts and features, encoder rows after the rotary time embedding, greedy tokens in exact mode."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from edge_af3 import AF3, GenerationOptions
from edge_af3.audio import load_audio
from edge_af3.constants import EOS_TOKEN_ID, SAMPLE_RATE
from edge_af3.family import Family, pooled_rows, row_times
from edge_af3.features import extract_features, token_count
from edge_af3.runtime.encoding import cut_frames

from .conftest import noise

QUESTION = "What is the genre?"
GREEDY = GenerationOptions(temperature=0)


@pytest.fixture(scope="module")
def mf_ckpt(tmp_path_factory):
    from edge_af3.reference.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("mf") / "mf-tiny", shape="tiny", seed=3, arch="musicflamingo")


@pytest.fixture(scope="module")
def mf_bundle(mf_ckpt, tmp_path_factory):
    from edge_af3.export import export

    return export(mf_ckpt, tmp_path_factory.mktemp("mfb") / "b", quant="f32", encoder_precision="fp32", verify=True)


@pytest.fixture(scope="module")
def mf_ref(mf_ckpt):
    from edge_af3.reference.loader import load_reference

    return load_reference(mf_ckpt)


@pytest.fixture(scope="module")
def mf(mf_bundle):
    with AF3.load(mf_bundle, exact=True, options=GREEDY) as m:
        yield m


def conversation(x, text=QUESTION):
    return [{"role": "user", "content": [{"type": "audio", "audio": x}, {"type": "text", "text": text}]}]


def strip_eos(ids):
    return ids[: ids.index(EOS_TOKEN_ID)] if EOS_TOKEN_ID in ids else ids


def test_row_times_are_transformers(mf_ref):
    """Our rows' seconds = `MusicFlamingoModel._build_audio_timestamps` for two clips of 3 and 2
    windows (the window index restarts at each clip)."""
    import torch

    per_window = [750, 750, 300, 750, 120]
    ids = [1] + [151670] + [151669] * 1800 + [151671, 2, 151670] + [151669] * 870 + [151671]
    got = mf_ref.model.model._build_audio_timestamps(torch.tensor([ids]), torch.tensor(per_window), 750).numpy()
    ours = np.concatenate([row_times(0, 3), row_times(0, 2)])
    assert got.dtype == ours.dtype and np.array_equal(got, ours)


@pytest.mark.slow
def test_token_counts_and_features_match_the_processor(mf_ref, mf_ckpt, tmp_path):
    """5 s .. 1250 s (Music Flamingo reads 1200 s: cut, with the warning) and 1750 s on the AF-Next
    shape (1800 s): `<|sound_bos|>` + the processor's `<sound>` count + `<|sound_eos|>`, and the
    features (every window's log-mel and mask) equal the processor's."""
    from transformers import AutoProcessor

    from edge_af3.reference.loader import reference_features
    from edge_af3.reference.tiny import make_checkpoint

    next_ckpt = make_checkpoint(tmp_path / "afnext", shape="tiny", seed=1, arch="afnext")
    families = {
        "mf": Family.from_checkpoint(mf_ckpt, _cfg(mf_ckpt)),
        "next": Family.from_checkpoint(next_ckpt, _cfg(next_ckpt)),
    }
    assert (families["mf"].max_windows, families["next"].max_windows) == (40, 60)
    assert (families["mf"].name, families["next"].name) == ("Music Flamingo", "AF-Next")
    processors = {"mf": mf_ref.processor, "next": AutoProcessor.from_pretrained(str(next_ckpt))}
    for which, seconds in (("mf", 5), ("mf", 30), ("mf", 47), ("mf", 650), ("mf", 1250), ("next", 1750)):
        x = noise(seconds, seed=seconds)
        fam, proc = families[which], processors[which]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            feats, mask, n_sound = reference_features(proc, x)
            clip = load_audio((x, SAMPLE_RATE), limit=fam.max_samples, model=fam.name)
        ids = proc.apply_chat_template(
            [conversation(x)],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            processor_kwargs={"sampling_rate": SAMPLE_RATE},
        )["input_ids"][0].tolist()
        start = ids.index(fam.sound_bos)
        assert ids[start + 1 + n_sound] == fam.sound_eos and ids.count(fam.sound_bos) == 1
        assert token_count(clip.samples.shape[0], clip.limit) == n_sound, (which, seconds)
        ours = extract_features(clip)
        assert ours.windows == feats.shape[0] == min(-(-seconds // 30), fam.max_windows)
        assert ours.truncated == (seconds > fam.max_seconds)
        assert np.abs(ours.features - feats).max() <= 1e-4 and np.array_equal(ours.mask, mask), (which, seconds)


def _cfg(path):
    return json.loads((path / "config.json").read_text())


def test_manifest_records_the_family(mf_bundle):
    m = json.loads((mf_bundle / "manifest.json").read_text())
    assert m["family"]["model_type"] == "musicflamingo" and m["family"]["time_embedding"]
    assert m["format_version"] == 2  # an edge-af3 that knows no families refuses it instead of failing in ORT
    assert m["features"]["max_windows"] == 40 and m["encoder"]["inputs"][-1] == "audio_times"
    assert m["special_ids"]["sound_bos"] == 151670 and m["special_ids"]["sound_eos"] == 151671
    assert m["verification"]["encoder"]["max_abs_diff"] <= 1e-4


def test_rows_after_the_time_embedding_match_transformers(mf, mf_ref):
    """Encoder rows (ONNX Runtime, fp32) vs `get_audio_features` for a 47 s clip: window 1's rows
    carry its own window index, the cut last window its own times."""
    x = noise(47.0, seed=47)
    want = mf_ref.clip_rows(x)
    got = mf.audio_rows((x, SAMPLE_RATE))
    assert got.shape == want.shape == (1175, mf.llm.n_embd)
    assert np.abs(got - want).max() <= 1e-4
    # the embedding matters: window 1 encoded with window 0's times gives other rows
    feats = extract_features((x, SAMPLE_RATE))
    frames = cut_frames(int(feats.mask[1].sum()))
    early = mf.encoder.encode(
        feats.features[1:2, :, :frames], feats.mask[1:2, :frames], row_times(0, 1, pooled_rows(frames))
    )
    assert np.abs(early[0, :425] - want[750:]).max() > 1e-2


def test_bound_buffers_feed_the_times_too(mf_bundle, mf_ref):
    """ONNX Runtime with bound buffers of bucket shapes (the CUDA-graph path, run here on the CPU
    provider): the rows' times padded to the bucket like the features. A 95 s clip's rows equal
    transformers' with its 3 full windows split over two runs (buckets of 2 and 1), padded into
    one bucket of 4, and encoded from window 1 on as the clip's windows 1.. (first=1)."""
    from edge_af3.engines.onnx import OnnxEncoder
    from edge_af3.runtime.encoding import iter_windows

    x = noise(95.0, seed=95)
    want = mf_ref.clip_rows(x)
    feats = extract_features((x, SAMPLE_RATE))
    split = OnnxEncoder(mf_bundle / "encoder.onnx", io_binding=True, max_windows=2)
    got = np.concatenate(list(iter_windows(split, feats, 4, timed=True)))
    assert np.abs(got - want).max() <= 1e-4
    assert sorted(split._bound) == [(1, 1000), (1, 3000), (2, 3000)]
    padded = OnnxEncoder(mf_bundle / "encoder.onnx", io_binding=True, max_windows=40)
    got = np.concatenate(list(iter_windows(padded, feats, 4, timed=True)))
    assert np.abs(got - want).max() <= 1e-4 and (4, 3000) in padded._bound
    later = extract_features((x[30 * SAMPLE_RATE :], SAMPLE_RATE))
    got = np.concatenate(list(iter_windows(padded, later, 4, timed=True, first=1)))
    assert np.abs(got - want[750:]).max() <= 1e-4


def test_a_gpu_runs_the_times_on_onnx_runtime_cuda():
    """Engine choice for a time-embedding bundle on a GPU box: TensorRT and torch-cuda are passed
    over with the reason; without ONNX Runtime CUDA the encoder stays on the CPU."""
    from edge_af3.engines.select import NO_TIMES, choose_encoder

    ok = {name: (lambda: None) for name in ("tensorrt", "onnxruntime-cuda", "torch-cuda")}
    c = choose_encoder("auto", gpu=lambda: "NVIDIA H100", probes=ok, timed=True)
    assert c.engine == "onnxruntime-cuda" and c.skipped == (("tensorrt", NO_TIMES),)
    c = choose_encoder("auto", gpu=lambda: "Orin", probes=ok | {"onnxruntime-cuda": lambda: "no ep"}, timed=True)
    assert c.engine == "onnxruntime-cpu" and dict(c.skipped) == {
        "tensorrt": NO_TIMES,
        "onnxruntime-cuda": "no ep",
        "torch-cuda": NO_TIMES,
    }
    assert choose_encoder("auto", gpu=lambda: "NVIDIA H100", probes=ok).engine == "tensorrt"  # AF3 as before
    # what plan counts: ONNX Runtime CUDA runs the fp32 graph as it is, TensorRT builds fp16 from it
    from edge_af3.engines.select import EncoderChoice
    from edge_af3.settings import resolve

    for engine, precision in (("onnxruntime-cuda", "fp32"), ("tensorrt", "fp16")):
        choice = EncoderChoice(engine, "cuda (NVIDIA H100)", gpu="NVIDIA H100")
        assert resolve("fp32", choice=choice, llm_gpu=True).encoder_precision == precision


@pytest.mark.slow
def test_greedy_tokens_match_transformers(mf, mf_ref):
    """Exact mode with the checkpoint's generation config: greedy tokens equal transformers' for 5 s,
    47 s and 650 s clips (22 windows: past AF3's 20), asked one after another."""
    for seconds in (5.0, 47.0, 650.0):
        x = noise(seconds, seed=int(seconds) + 7)
        want = strip_eos(mf_ref.generate(conversation(x), max_new_tokens=24))
        ans = mf.ask(QUESTION, (x, SAMPLE_RATE), max_new_tokens=24)
        assert list(ans.tokens) == want, seconds
        assert ans.timings.audio_tokens == token_count(x.shape[0], mf.family.max_samples)


def test_follow_up_turn_with_a_second_clip_matches_transformers(mf, mf_ref):
    a, b = noise(6.0, seed=61), noise(9.0, seed=62)
    chat = mf.chat()
    first = chat.send(QUESTION, audio=(a, SAMPLE_RATE), max_new_tokens=8)
    second = chat.send("And this one?", audio=(b, SAMPLE_RATE), max_new_tokens=16)
    conv = conversation(a) + [
        {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
        {"role": "user", "content": [{"type": "audio", "audio": b}, {"type": "text", "text": "And this one?"}]},
    ]
    assert list(first.tokens) == strip_eos(mf_ref.generate(conversation(a), max_new_tokens=8))
    assert list(second.tokens) == strip_eos(mf_ref.generate(conv, max_new_tokens=16))


def test_95_s_through_the_memory_answers_as_transformers(mf_bundle, mf_ref):
    """The audio memory on Music Flamingo: each window encoded with its place in the memory (the
    time embedding) and prefilled once, `<|sound_bos|>` ending the head and `<|sound_eos|>`
    starting the question: until an eviction the greedy answer equals transformers' for the 95 s
    as one clip, and the question decodes only its own tokens."""
    x = noise(95, seed=95)
    with AF3.load(mf_bundle, exact=True, options=GREEDY, n_seq=2, n_ctx=8192) as model:
        with model.memory(120, tail_every=10.0) as mem:
            for i in range(0, x.size, 8000):
                mem.feed(x[i : i + 8000])
            mem.flush()
            assert [(w.index, w.seconds) for w in mem.held] == [(0, 30), (1, 30), (2, 30), (3, 5)]
            # each window's rows with its place in the clip (16 greedy tokens of a tiny model need
            # not notice a wrong place: the rows do)
            rows = np.concatenate([w.rows for w in mem.held])
            assert np.abs(rows - mf_ref.clip_rows(x)).max() <= 1e-4
            ans = mem.ask(QUESTION, max_new_tokens=16)
    want = strip_eos(mf_ref.generate(conversation(x), max_new_tokens=16))
    assert list(ans.tokens) == want
    ids = mf_ref.inputs(conversation(x))["input_ids"][0].tolist()
    after_audio = len(ids) - ids.index(151671)  # <|sound_eos|> and the question's tokens
    assert ans.timings.prompt_tokens == len(ids)
    assert ans.timings.prompt_tokens - ans.timings.reused_tokens == after_audio


def _feed(mem, x):
    for i in range(0, x.size, 8000):
        mem.feed(x[i : i + 8000])
    mem.flush()


def test_exact_memory_and_time_ranges_encode_kept_windows_at_their_new_place(mf_bundle, mf_ref):
    """A 60 s memory fed 95 s: window 0 is evicted and windows 1, 2 and the 5 s tail become the
    memory's windows 0, 1, 2. Exact mode encodes the kept windows again at their new places and
    re-prefills them: rows and greedy answer equal transformers' for the kept 65 s as one clip
    (without the rebuild the rows are far off: checked). A time-range question makes its windows
    a clip of their own from the archived samples: equal to transformers' for those 60 s."""
    x = noise(95, seed=96)
    kept, first_minute = x[30 * SAMPLE_RATE :], x[: 60 * SAMPLE_RATE]
    with AF3.load(mf_bundle, exact=True, options=GREEDY, n_seq=3, n_ctx=8192) as model:
        with model.memory(60, tail_every=10.0) as mem:
            _feed(mem, x)
            rows = np.concatenate([w.rows for w in mem.held])
            assert np.abs(rows - mf_ref.clip_rows(kept)).max() > 1e-2  # approximate: places changed
        with model.memory(60, tail_every=10.0, exact=True) as mem:
            _feed(mem, x)
            assert [(w.index, w.seconds) for w in mem.held] == [(1, 30), (2, 30), (3, 5)]
            assert mem.wait_exact(timeout=600) and mem.stats.rebuilds >= 1
            rows = np.concatenate([w.rows for w in mem.held])
            assert np.abs(rows - mf_ref.clip_rows(kept)).max() <= 1e-4
            ans = mem.ask(QUESTION, max_new_tokens=16)
            ranged = mem.stream(QUESTION, at=(0.0, 60.0), max_new_tokens=16)
            assert ranged.span == [(0.0, 30.0), (30.0, 60.0)]
            ranged = ranged.result()
    assert list(ans.tokens) == strip_eos(mf_ref.generate(conversation(kept), max_new_tokens=16))
    assert list(ranged.tokens) == strip_eos(mf_ref.generate(conversation(first_minute), max_new_tokens=16))


def test_listen_memory_takes_the_models_own_limit(mf_bundle, tiny_bundle, tmp_path):
    """`listen --memory 11m`: past AF3's 10 minutes, which Music Flamingo holds (20) and AF3
    refuses in one line naming its limit."""
    import soundfile as sf

    from .conftest import run_cli

    path = tmp_path / "40s.wav"
    sf.write(path, noise(40, seed=40), SAMPLE_RATE, subtype="FLOAT")
    args = ["listen", "--file", str(path), "--memory", "11m", "--ask", QUESTION, "--json", "-t", "0", "-n", "4"]
    res = run_cli(*args, "-m", str(mf_bundle))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    answer = next(x for x in lines if "answer" in x)
    assert answer["span"] == [[0.0, 30.0], [30.0, 40.0]]
    res = run_cli(*args, "-m", str(tiny_bundle))
    assert res.returncode == 1 and "[invalid_option]" in res.stderr and "Traceback" not in res.stderr
    assert "30 s to 10 minutes (AF3 reads at most 20 windows)" in res.stderr, res.stderr


def test_a_lora_adapter_on_music_flamingo_equals_transformers_peft(tmp_path):
    """make-tiny --think on the Music Flamingo shape (a LoRA on the LLM plus non-LoRA weights, as
    AF3 ships think/): `think=True` gives transformers + PEFT's greedy tokens for a 47 s clip."""
    from edge_af3.constants import THINK_SUFFIX
    from edge_af3.export import export
    from edge_af3.reference.adapters import apply_adapter
    from edge_af3.reference.loader import Reference, load_reference
    from edge_af3.reference.tiny import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "mft", shape="tiny", seed=5, arch="musicflamingo", think=True)
    bundle = export(ckpt, tmp_path / "b", quant="f32", encoder_precision="fp32", verify=False)
    ref = load_reference(ckpt)
    think = Reference(model=apply_adapter(ref.model, ckpt), processor=ref.processor, path=ref.path)
    x = noise(47.0, seed=4)
    with AF3.load(bundle, exact=True, options=GREEDY) as model:
        got = model.ask(QUESTION, (x, SAMPLE_RATE), think=True, max_new_tokens=24)
        base = model.ask(QUESTION, (x, SAMPLE_RATE), max_new_tokens=24)
    assert got.adapter == "think" and base.tokens != got.tokens  # the adapter changes the answer
    assert list(got.tokens) == strip_eos(think.generate(conversation(x, QUESTION + THINK_SUFFIX), max_new_tokens=24))


def test_serve_on_music_flamingo_equals_transformers(mf_bundle, mf_ref, tmp_path):
    """`edge-af3 serve --exact` of a Music Flamingo bundle over real HTTP (the openai SDK): greedy
    text and prompt tokens (bos/eos around the rows) as transformers'."""
    from .test_server import Server, user, wav_bytes

    x = noise(47.0, seed=9)
    srv = Server(mf_bundle, "--exact", tmp_path=tmp_path, key=None)
    try:
        r = srv.client(timeout=300).chat.completions.create(
            model="edge-af3", messages=[user(QUESTION, wav_bytes(x))], max_tokens=16, temperature=0
        )
    finally:
        srv.stop()
    want = strip_eos(mf_ref.generate(conversation(x), max_new_tokens=16))
    assert r.choices[0].message.content == mf_ref.processor.tokenizer.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == mf_ref.inputs(conversation(x))["input_ids"].shape[1]


def test_doctor_names_the_architecture(mf_bundle):
    from .conftest import run_cli

    res = run_cli("doctor", "-m", str(mf_bundle), "--json")
    assert res.returncode == 0, res.stderr
    arch = json.loads(res.stdout)["model"]["architecture"]
    assert arch == {
        "model_type": "musicflamingo",
        "name": "Music Flamingo",
        "max_seconds": 1200,
        "time_embedding": True,
    }


def test_make_tiny_names_the_architecture_as_the_published_configs_do(mf_ckpt, tiny_ckpt):
    """vLLM picks the generation model by `architectures` (without it: the base model, an
    embedding server)."""
    assert _cfg(mf_ckpt)["architectures"] == ["MusicFlamingoForConditionalGeneration"]
    assert _cfg(tiny_ckpt)["architectures"] == ["AudioFlamingo3ForConditionalGeneration"]


def test_refusals_say_why(mf_ckpt, mf_bundle, tmp_path):
    """fp16 angles cannot carry 20 minutes of times; TensorRT and torch take no times; a field of a
    newer exporter is left out, not a crash."""
    from edge_af3 import OptionsError
    from edge_af3.export import export

    with pytest.raises(OptionsError, match="fp32 angles"):
        export(mf_ckpt, tmp_path / "fp16", quant="f32", encoder_precision="fp16", verify=False)
    assert not (tmp_path / "fp16").exists()
    with pytest.raises(OptionsError, match="runs on onnxruntime-cpu or onnxruntime-cuda, not torch-cpu"):
        AF3.load(mf_bundle, encoder_engine="torch-cpu")
    m = json.loads((mf_bundle / "manifest.json").read_text())
    m["family"]["from_the_future"] = 1
    assert Family.from_manifest(m).max_windows == 40
