"""The fused runtime: features (numpy) -> encoder (ONNX Runtime) -> audio rows into llama.cpp at
the `<sound>` slots -> streamed text. No torch.

    model = AF3.load("./af3-bundle")
    print(model.ask("clip.wav", "What do you hear?").text)
    for piece in model.stream("clip.wav", "Describe it."): print(piece, end="")
    chat = model.chat(); chat.send("What is this?", audio="clip.wav"); chat.send("And the tempo?")
"""

from __future__ import annotations

import codecs
import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .audio import Audio, AudioSource, load_audio
from .bundle import Bundle, open_bundle
from .constants import EOS_TOKEN_ID, N_FRAMES, ROWS_PER_WINDOW, THINK_SUFFIX
from .engines.llamacpp import LlamaEngine, SamplerOptions, supports_gpu_offload
from .engines.onnx import OnnxEncoder
from .engines.select import choose_encoder
from .features import extract_features
from .prompt import Message, render, split_sound


@dataclass(frozen=True)
class Timings:
    features_ms: float = 0.0
    encoder_ms: float = 0.0
    prefill_ms: float = 0.0
    first_token_ms: float = 0.0  # from the call to the first token
    decode_tokens_per_s: float = 0.0
    audio_tokens: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: tuple[int, ...]
    timings: Timings


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 500
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    think: bool = False
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks, like llama.cpp's --ignore-eos)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")


def _as_list(audio) -> list:
    if audio is None:
        return []
    if isinstance(audio, list):
        return audio
    return [audio]


@dataclass
class _Stats:
    features_ms: float = 0.0
    encoder_ms: float = 0.0
    audio_tokens: int = 0


def encode_windows(encoder, feats, windows_per_run: int = 1) -> np.ndarray:
    """Valid projected rows [N, H] of a clip. Full windows go `windows_per_run` at a time (bounded
    memory: a 10 min clip is 20 windows; on 2 CPU cores 1 per run is as fast as 2 and peaks
    ~380 MB lower on bench-small); a partial last window is cut 4 frames past its valid
    frames, so a 5 s clip costs a sixth of a window (its rows are the same: see onnx_encoder)."""
    out = []
    n_windows = feats.features.shape[0]
    full = [w for w in range(n_windows) if feats.rows_per_window[w] == ROWS_PER_WINDOW]
    for start in range(0, len(full), max(1, windows_per_run)):
        ws = full[start : start + windows_per_run]
        rows = encoder.encode(feats.features[ws], feats.mask[ws])
        out.extend(rows[i, :ROWS_PER_WINDOW] for i in range(len(ws)))
    for w in range(n_windows):
        if feats.rows_per_window[w] != ROWS_PER_WINDOW:  # only ever the last window
            valid = int(feats.mask[w].sum())
            frames = min(N_FRAMES, valid + 4 + (valid % 2)) if getattr(encoder, "dynamic_frames", False) else N_FRAMES
            rows = encoder.encode(feats.features[w : w + 1, :, :frames], feats.mask[w : w + 1, :frames])
            out.append(rows[0, : feats.rows_per_window[w]])
    return np.concatenate(out)


class AF3:
    """An exported AF3 bundle, loaded: one encoder session and one llama.cpp context."""

    def __init__(self, bundle: Bundle, *, n_ctx: int = 8192, threads: int | None = None, n_batch: int = 512,
                 kv_type: str = "f16", flash_attn: bool | None = None, cache_size: int = 16,
                 device: str = "cpu", n_gpu_layers: int | None = None, windows_per_run: int = 1):  # fmt: skip
        self.bundle = bundle
        self.template = bundle.manifest.get("chat_template")
        if not self.template:
            raise ValueError(f"{bundle.path}: the manifest has no chat template")
        self.engine_choice = choose_encoder(device)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.engine_choice.engine == "onnxruntime-cuda" else None
        self.encoder = OnnxEncoder(bundle.encoder, threads=threads, providers=providers)
        on_gpu = self.engine_choice.gpu is not None and supports_gpu_offload()
        if n_gpu_layers is None:
            n_gpu_layers = 999 if on_gpu else 0  # all layers offloaded on a GPU
        self.llm = LlamaEngine(bundle.llm, n_ctx=n_ctx, n_batch=n_batch, threads=threads, kv_type=kv_type,
                               flash_attn=True if (on_gpu and flash_attn is None) else flash_attn,
                               n_gpu_layers=n_gpu_layers)  # fmt: skip
        if self.llm.n_embd != bundle.hidden_size:
            raise ValueError(f"{bundle.path}: LLM width {self.llm.n_embd} != encoder rows {bundle.hidden_size}")
        self.lock = threading.RLock()  # one llama.cpp context: one generation at a time
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()  # audio hash -> rows [N, H]
        self._cache_size = cache_size
        self.windows_per_run = windows_per_run
        self._owner: object | None = None  # which session's tokens are in the KV cache

    @classmethod
    def load(cls, source: str | os.PathLike, *, device: str = "auto", n_ctx: int = 8192, threads: int | None = None,
             check_hashes: bool = True, quant: str = "q4_k_m", progress=None, **kwargs) -> "AF3":  # fmt: skip
        """Load a bundle; a checkpoint folder or Hub id is exported once into the cache, then reused."""
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
        path = locate(source, quant=quant, progress=progress)
        return cls(open_bundle(path, check_hashes=check_hashes), n_ctx=n_ctx, threads=threads, device=device, **kwargs)

    # -- audio -----------------------------------------------------------------------------
    def audio_rows(self, audio: AudioSource, stats: _Stats | None = None) -> np.ndarray:
        """Projected rows [N, H] for one clip; the same samples are encoded only once."""
        clip = audio if isinstance(audio, Audio) else load_audio(audio)
        key = hashlib.sha256(clip.samples.tobytes()).hexdigest()
        if key in self._rows:
            self._rows.move_to_end(key)
            if stats:
                stats.audio_tokens += self._rows[key].shape[0]
            return self._rows[key]
        t0 = time.perf_counter()
        feats = extract_features(clip)
        t1 = time.perf_counter()
        rows = encode_windows(self.encoder, feats, self.windows_per_run)
        t2 = time.perf_counter()
        if stats:
            stats.features_ms += (t1 - t0) * 1000
            stats.encoder_ms += (t2 - t1) * 1000
            stats.audio_tokens += rows.shape[0]
        self._rows[key] = rows
        while len(self._rows) > self._cache_size:
            self._rows.popitem(last=False)
        return rows

    # -- one-shot questions ----------------------------------------------------------------
    def stream(self, audio, prompt: str, **options) -> Iterator[str]:
        """Text pieces as they are produced for one question about `audio` (or a list of clips)."""
        session = self.chat()
        return session.stream(prompt, audio=audio, **options)

    def ask(self, audio, prompt: str, **options) -> Answer:
        session = self.chat()
        return session.send(prompt, audio=audio, **options)

    def chat(self, system: str | None = None) -> "ChatSession":
        return ChatSession(self, system)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "AF3":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModelNotFoundError(ValueError):
    """`source` is neither a bundle, an AF3 checkpoint folder nor a reachable Hub id; says what was tried."""


def locate(source: str | os.PathLike, *, quant: str = "q4_k_m", progress=None) -> Path:
    """The bundle folder for `source`: a bundle as it is; a checkpoint folder or Hub id exported once."""
    from .reference.loader import CheckpointError

    text = str(source)
    path = Path(text).expanduser()
    tried = []
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return path
        tried.append(f"bundle: {path} has no manifest.json")
        if (path / "config.json").is_file():
            return _exported(path, quant, progress)  # a non-AF3 config is refused there, with the reason
        tried.append(f"checkpoint folder: {path} has no config.json")
    elif path.exists():
        tried.append(f"bundle or checkpoint folder: {path} is a file")
    else:
        tried.append(f"local folder: {path} does not exist")
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            try:
                return _exported(text, quant, progress)
            except CheckpointError as e:
                tried.append(f"Hub id: {e}")
        else:
            tried.append(f"Hub id: {text!r} is not of the form 'org/name'")
    raise ModelNotFoundError(f"cannot load model {text!r}; tried:\n  - " + "\n  - ".join(tried))


def _exported(source, quant: str, progress=None) -> Path:
    """Export a checkpoint (folder or Hub id) once into ~/.cache/edge-af3/bundles and reuse it."""
    from .reference.loader import resolve_checkpoint
    from .reference.vocab import cache_dir

    ckpt = resolve_checkpoint(source)
    key = hashlib.sha256(f"{ckpt.resolve()}:{quant}".encode()).hexdigest()[:16]
    out = cache_dir() / "bundles" / f"{ckpt.name}-{quant}-{key}"
    if not (out / "manifest.json").is_file():
        try:
            from .export import export
        except ImportError as e:
            raise RuntimeError(
                f"{source} is a checkpoint; exporting it needs the export extra ({e.name} is missing): "
                "pip install 'edge-af3[export]', or pass an exported bundle"
            ) from e
        export(ckpt, out, quant=quant, force=True, progress=progress)
    return out


class ChatSession:
    """A conversation that keeps its KV cache: a follow-up costs only its own tokens."""

    def __init__(self, model: AF3, system: str | None = None):
        self.model = model
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[Message] = [Message("system", self.system)] if self.system is not None else []
        self.audio: list[np.ndarray] = []  # rows of every audio so far, in prompt order
        self.rendered = ""  # prompt text whose tokens are in the KV cache
        self.n_past = 0
        self.prefilled_tokens = 0  # counters for tests: work actually done
        self.last_answer: Answer | None = None
        if self.model._owner is self:
            self.model._owner = None

    # The KV cache holds `self.rendered` (with audio rows at its <sound> slots) at [0, n_past).
    def _sync(self, stats: _Stats) -> None:
        """Make the KV cache hold this session's history (after another session used it)."""
        llm = self.model.llm
        if self.model._owner is self:
            llm.truncate(self.n_past)
            return
        llm.reset()
        self.model._owner = self
        self.n_past = 0
        if self.rendered:
            self._prefill(self.rendered, self.audio, stats)

    def _prefill(self, text: str, rows: Sequence[np.ndarray], stats: _Stats) -> None:
        pieces = split_sound(text)
        if len(pieces) != len(rows) + 1:
            raise ValueError(f"the prompt has {len(pieces) - 1} <sound> slots for {len(rows)} audio clip(s)")
        llm = self.model.llm
        needed = llm.n_past + sum(len(llm.tokenize(p)) for p in pieces) + sum(r.shape[0] for r in rows)
        if needed > llm.n_ctx:
            raise ValueError(f"the prompt needs {needed} positions but n_ctx is {llm.n_ctx}; load with n_ctx >= {needed + 512}")
        for i, piece in enumerate(pieces):
            ids = llm.tokenize(piece)
            last = i == len(pieces) - 1
            if ids:  # the last decode of the prompt keeps its logits for the first sample
                llm.decode_tokens(ids, logits="last" if last else "none")
                self.prefilled_tokens += len(ids)
            if i < len(rows):
                llm.decode_embeddings(rows[i], logits="last" if (last or not pieces[i + 1]) else "none")
                self.prefilled_tokens += rows[i].shape[0]
        self.n_past = llm.n_past

    def stream(self, text: str, *, audio=None, **options) -> Iterator[str]:
        opts = GenerationOptions(**options)
        return self._generate(text, audio, opts, None)

    def send(self, text: str, *, audio=None, **options) -> Answer:
        opts = GenerationOptions(**options)
        box: list[Answer] = []
        for _ in self._generate(text, audio, opts, box):
            pass
        return box[0]

    def _generate(self, text: str, audio, opts: GenerationOptions, box) -> Iterator[str]:
        model, llm = self.model, self.model.llm
        t_start = time.perf_counter()
        stats = _Stats()
        clips = [model.audio_rows(a, stats) for a in _as_list(audio)]  # before the lock: no KV touched
        user = Message("user", text + (THINK_SUFFIX if opts.think else ""), n_audio=len(clips))
        new_messages = self.messages + [user]
        full = render(model.template, new_messages, add_generation_prompt=True)
        if not full.startswith(self.rendered):
            raise RuntimeError("the chat template does not render conversations incrementally")
        with model.lock:
            self._sync(stats)
            start_past = self.n_past
            t0 = time.perf_counter()
            try:
                self._prefill(full[len(self.rendered) :], clips, stats)
            except BaseException:
                llm.truncate(start_past)
                self.n_past = start_past
                raise
            t_prefill = time.perf_counter() - t0
            sampler = llm.make_sampler(SamplerOptions(opts.temperature, opts.top_k, opts.top_p, opts.seed))
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            tokens: list[int] = []
            t_first = t_last = None
            finished = False
            try:
                while len(tokens) < opts.max_new_tokens:
                    tok = llm.sample(sampler)
                    if t_first is None:
                        t_first = time.perf_counter()
                    if (tok == EOS_TOKEN_ID or llm.is_eog(tok)) and not opts.ignore_eos:
                        break
                    tokens.append(tok)
                    piece = decoder.decode(llm.piece(tok))
                    llm.decode_next(tok)
                    if piece:
                        yield piece
                t_last = time.perf_counter()
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
                finished = True
            finally:
                llm.free_sampler(sampler)
                reply = b"".join(llm.piece(t) for t in tokens).decode("utf-8", "replace")
                if finished:
                    self._commit(full, user, reply, tokens, clips)
                else:  # interrupted: forget this turn, keep the session usable
                    llm.truncate(start_past)
                    self.n_past = start_past
        t_end = time.perf_counter()
        n = len(tokens)
        decode_s = (t_last or t_end) - (t_first or t_end)  # sampling to the last token; the history update is not decoding
        timings = Timings(
            features_ms=stats.features_ms,
            encoder_ms=stats.encoder_ms,
            prefill_ms=t_prefill * 1000,
            first_token_ms=((t_first or t_end) - t_start) * 1000,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            audio_tokens=stats.audio_tokens,
            prompt_tokens=self.n_past,
        )
        self.last_answer = Answer(text=reply, tokens=tuple(tokens), timings=timings)
        if box is not None:
            box.append(self.last_answer)

    def _commit(self, full: str, user: Message, reply: str, tokens: list[int], clips: list[np.ndarray]) -> None:
        """Put the finished turn in the history; the KV cache then holds exactly the rendered text.

        The reference re-tokenises the reply text on the next turn; when that differs from the
        sampled ids, only the reply is re-decoded (never the earlier prompt or the audio).
        """
        llm = self.model.llm
        prompt_end = llm.n_past - len(tokens)
        self.messages = self.messages + [user, Message("assistant", reply)]
        self.audio = self.audio + clips
        rendered = render(self.model.template, self.messages, add_generation_prompt=False)
        tail = rendered[len(full) :]
        canonical = llm.tokenize(tail)
        if canonical[: len(tokens)] == tokens:
            llm.truncate(prompt_end + len(tokens))
            rest = canonical[len(tokens) :]
        else:
            llm.truncate(prompt_end)
            rest = canonical
        if rest:
            llm.decode_tokens(rest, logits="none")
            self.prefilled_tokens += len(rest)
        self.rendered = rendered
        self.n_past = llm.n_past
