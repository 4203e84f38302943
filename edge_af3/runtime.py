"""The fused runtime: features (numpy) -> encoder (ONNX Runtime) -> audio rows into llama.cpp at
the `<sound>` slots -> streamed text. No torch.

    model = AF3.load("./af3-bundle")
    print(model.ask("clip.wav", "What do you hear?").text)
    for piece in model.stream("clip.wav", "Describe it."): print(piece, end="")
    chat = model.chat(); chat.send("What is this?", audio="clip.wav"); chat.send("And the tempo?")
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .audio import Audio, AudioSource, load_audio
from .bundle import Bundle, open_bundle
from .constants import EOS_TOKEN_ID, N_FRAMES, ROWS_PER_WINDOW, THINK_SUFFIX
from .engines.llamacpp import LlamaEngine, SamplerOptions, supports_gpu_offload
from .engines.select import choose_encoder, forced_encoder, make_encoder
from .features import extract_features, token_count
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
    reused_tokens: int = 0  # prompt positions the KV cache already held (not decoded again)


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


def cut_frames(valid: int) -> int:
    """Frames a partial window is cut to: 4 past its valid frames (the convolutions reach 2), even."""
    return min(N_FRAMES, valid + 4 + (valid % 2))


def iter_windows(encoder, feats, windows_per_run: int = 1, lock: threading.Lock | None = None) -> Iterator[np.ndarray]:
    """Valid projected rows of a clip, in prompt order, one chunk per encoder run. Full windows go
    `windows_per_run` at a time (bounded memory: a 10 min clip is 20 windows; on 2 CPU cores 1 per
    run is as fast as 2 and peaks ~380 MB lower on bench-small); a partial last window is cut past
    its valid frames, so a 5 s clip costs a sixth of a window (same rows: see onnx_encoder)."""
    lock = lock or contextlib.nullcontext()
    n_windows = feats.features.shape[0]
    full = [w for w in range(n_windows) if feats.rows_per_window[w] == ROWS_PER_WINDOW]
    for start in range(0, len(full), max(1, windows_per_run)):
        ws = full[start : start + windows_per_run]
        with lock:
            rows = encoder.encode(feats.features[ws], feats.mask[ws])
        yield rows[:, :ROWS_PER_WINDOW].reshape(-1, rows.shape[-1])
    for w in range(n_windows):
        if feats.rows_per_window[w] != ROWS_PER_WINDOW:  # only ever the last window
            frames = cut_frames(int(feats.mask[w].sum())) if getattr(encoder, "dynamic_frames", False) else N_FRAMES
            with lock:
                rows = encoder.encode(feats.features[w : w + 1, :, :frames], feats.mask[w : w + 1, :frames])
            yield rows[0, : feats.rows_per_window[w]]


class _Clip:
    """One clip of a prompt: its identity (sha256 of the samples), its row count (known from the
    sample count before encoding) and its rows, either ready or still being encoded on a
    background thread (`overlap`): the prefill then takes each chunk as soon as it exists."""

    def __init__(self, key: str, count: int, rows: np.ndarray | None = None):
        self.key, self.count, self.rows = key, count, rows
        self.features_ms = self.encoder_ms = 0.0
        self.error: BaseException | None = None
        self._queue: queue.Queue | None = None

    def __len__(self) -> int:
        return self.count

    def encode(self, model: "AF3", clip: Audio, emit: Callable[[np.ndarray], None] | None = None) -> "_Clip":
        """Features, then the encoder one run at a time (each chunk to `emit` as it is made); the
        rows are kept here (a history re-decoded later uses them) and in the model's cache."""
        t0 = time.perf_counter()
        feats = extract_features(clip)
        t1 = time.perf_counter()
        self.features_ms = (t1 - t0) * 1000
        got = []
        for chunk in iter_windows(model.encoder, feats, model.windows_per_run, model._encoder_lock):
            got.append(chunk)
            if emit:
                emit(chunk)
        self.encoder_ms = (time.perf_counter() - t1) * 1000
        self.rows = np.concatenate(got)
        model._remember(self.key, self.rows)
        return self

    def start(self, model: "AF3", clip: Audio) -> "_Clip":
        """`encode` on a thread; `chunks()` hands over each chunk as it comes."""
        self._queue = queue.Queue()
        threading.Thread(target=self._encode_queued, args=(model, clip), name="edge-af3-encoder", daemon=True).start()
        return self

    def _encode_queued(self, model: "AF3", clip: Audio) -> None:
        try:
            self.encode(model, clip, self._queue.put)
            self._queue.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            self.error = e
            self._queue.put(e)

    def chunks(self) -> Iterator[np.ndarray]:
        if self.rows is not None:
            yield self.rows
            return
        if self.error is not None:
            raise self.error
        n = 0
        while True:
            item = self._queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            n += item.shape[0]
            yield item
        if n != self.count:
            raise RuntimeError(f"the encoder gave {n} rows for a clip of {self.count} audio tokens")


def _items(segments: Sequence) -> Iterator:
    """What each KV position holds for a list of segments (token id lists and clips)."""
    for seg in segments:
        if isinstance(seg, _Clip):
            for i in range(seg.count):
                yield (seg.key, i)
        else:
            yield from seg


class AF3:
    """An exported AF3 bundle, loaded: one encoder engine and one llama.cpp context."""

    def __init__(self, bundle: Bundle, *, n_ctx: int = 8192, threads: int | None = None, n_batch: int = 512,
                 kv_type: str = "f16", flash_attn: bool | None = None, cache_size: int = 16,
                 device: str = "cpu", n_gpu_layers: int | None = None, windows_per_run: int | None = None,
                 encoder_engine: str | None = None, overlap: bool | None = None):  # fmt: skip
        self.bundle = bundle
        self.template = bundle.manifest.get("chat_template")
        if not self.template:
            raise ValueError(f"{bundle.path}: the manifest has no chat template")
        self.engine_choice = choose_encoder(device) if encoder_engine is None else forced_encoder(encoder_engine, device)
        self.encoder, self.engine_choice = make_encoder(bundle, self.engine_choice, threads=threads,
                                                        fallback=encoder_engine is None)  # fmt: skip
        on_gpu_encoder = self.encoder.name not in ("onnxruntime-cpu", "torch-cpu")
        # a GPU encoder is fast per window and idle while llama.cpp prefills: several windows per
        # run, encoded on a thread while llama.cpp takes the text before the clip and the earlier
        # windows; on a CPU both compete for the same cores, so one window per run, in line
        self.windows_per_run = windows_per_run or (4 if on_gpu_encoder else 1)
        self.overlap = on_gpu_encoder if overlap is None else overlap
        on_gpu = self.engine_choice.gpu is not None and supports_gpu_offload()
        if n_gpu_layers is None:
            n_gpu_layers = 999 if on_gpu else 0  # all layers offloaded on a GPU
        # n_batch 512: llama.cpp reserves logits for every row of a ubatch, so its compute buffer
        # grows with it (bench-small: 300 MiB at 512, 1199 MiB at 2048), while on 2 CPU cores 512,
        # 1024 and 2048 prefill a 30 s clip alike (3.43 / 3.69 / 3.38 s)
        self.llm = LlamaEngine(bundle.llm, n_ctx=n_ctx, n_batch=n_batch, threads=threads, kv_type=kv_type,
                               flash_attn=True if (on_gpu and flash_attn is None) else flash_attn,
                               n_gpu_layers=n_gpu_layers)  # fmt: skip
        if self.llm.n_embd != bundle.hidden_size:
            raise ValueError(f"{bundle.path}: LLM width {self.llm.n_embd} != encoder rows {bundle.hidden_size}")
        self.lock = threading.RLock()  # one llama.cpp context: one generation at a time
        self._encoder_lock = threading.Lock()  # one encoder run at a time (CUDA graphs share buffers)
        self._rows_lock = threading.Lock()
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()  # audio hash -> rows [N, H]
        self._cache_size = cache_size

    @classmethod
    def load(cls, source: str | os.PathLike, *, device: str = "auto", n_ctx: int = 8192, threads: int | None = None,
             check_hashes: bool = True, quant: str = "q4_k_m", progress=None, **kwargs) -> "AF3":  # fmt: skip
        """Load a bundle; a checkpoint folder or Hub id is exported once into the cache, then reused."""
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
        path = locate(source, quant=quant, progress=progress)
        return cls(open_bundle(path, check_hashes=check_hashes), n_ctx=n_ctx, threads=threads, device=device, **kwargs)

    # -- audio -----------------------------------------------------------------------------
    def _cached(self, key: str) -> np.ndarray | None:
        with self._rows_lock:
            rows = self._rows.get(key)
            if rows is not None:
                self._rows.move_to_end(key)
            return rows

    def _remember(self, key: str, rows: np.ndarray) -> None:
        with self._rows_lock:
            self._rows[key] = rows
            while len(self._rows) > self._cache_size:
                self._rows.popitem(last=False)

    def _clip(self, audio: AudioSource, *, overlap: bool) -> _Clip:
        """The clip's rows: cached, encoded now, or (overlap) being encoded on a thread."""
        clip = audio if isinstance(audio, Audio) else load_audio(audio)
        key = hashlib.sha256(clip.samples.tobytes()).hexdigest()
        count = token_count(clip.samples.shape[0])
        rows = self._cached(key)
        if rows is not None:
            return _Clip(key, count, rows)
        if clip.samples.size == 0:
            extract_features(clip)  # raises the clear "no samples" error here, not on the thread
        if overlap:
            return _Clip(key, count).start(self, clip)
        return _Clip(key, count).encode(self, clip)

    def audio_rows(self, audio: AudioSource) -> np.ndarray:
        """Projected rows [N, H] for one clip; the same samples are encoded only once."""
        return self._clip(audio, overlap=False).rows

    def forget(self) -> None:
        """Drop every cached clip and the KV cache (the next question starts cold)."""
        with self.lock:
            with self._rows_lock:
                self._rows.clear()
            self.llm.reset()

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
    """A conversation. Its history is a list of segments (token id lists and clips) that the KV
    cache should hold; each turn keeps whatever prefix the cache already holds, from this session
    or any other (a follow-up costs only its own tokens; a new question about the same clip skips
    the system prompt and the clip's rows; a new clip still skips the system prompt), and decodes
    the rest."""

    def __init__(self, model: AF3, system: str | None = None):
        self.model = model
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[Message] = [Message("system", self.system)] if self.system is not None else []
        self.rendered = ""  # prompt text of the history
        self.segments: list = []  # the history as the KV cache holds it: token id lists and clips
        self.prefilled_tokens = 0  # counters for tests: work actually done
        self.last_answer: Answer | None = None

    @property
    def audio(self) -> list[np.ndarray]:
        """Rows of every clip so far, in prompt order (a clip still encoding is waited for)."""
        return [seg.rows if seg.rows is not None else np.concatenate(list(seg.chunks()))
                for seg in self.segments if isinstance(seg, _Clip)]  # fmt: skip

    @property
    def n_tokens(self) -> int:
        """Positions the history takes in the context."""
        return sum(len(seg) for seg in self.segments)

    def _turn(self, text: str, clips: list[_Clip]) -> list:
        """Segments of the text after the history, with the clips at its <sound> slots."""
        pieces = split_sound(text)
        if len(pieces) != len(clips) + 1:
            raise ValueError(f"the prompt has {len(pieces) - 1} <sound> slots for {len(clips)} audio clip(s)")
        out: list = []
        for i, piece in enumerate(pieces):
            ids = self.model.llm.tokenize(piece)
            if ids:
                out.append(ids)
            if i < len(clips):
                out.append(clips[i])
        return out

    def _prefill(self, target: list) -> int:
        """Make the KV cache hold `target`, decoding only what it does not hold yet; the last decode
        keeps its logits. Returns how many positions were reused."""
        llm = self.model.llm
        total = sum(len(seg) for seg in target)
        if total > llm.n_ctx:
            raise ValueError(f"the prompt needs {total} positions but n_ctx is {llm.n_ctx}; load with n_ctx >= {total + 512}")
        reuse = min(llm.common_prefix(_items(target)), total - 1)  # at least one decode: the logits
        llm.truncate(reuse)
        last = max(i for i, seg in enumerate(target) if len(seg))
        offset = 0
        for i, seg in enumerate(target):
            n, skip = len(seg), max(0, reuse - offset)
            offset += n
            if skip >= n:
                continue  # already in the cache (a clip still encoding is left to finish on its own)
            if not isinstance(seg, _Clip):
                llm.decode_tokens(seg[skip:], logits="last" if i == last else "none")
                self.prefilled_tokens += n - skip
                continue
            pos = 0
            for chunk in seg.chunks():  # a clip being encoded: each chunk as soon as it exists
                lo, hi = max(skip, pos), pos + chunk.shape[0]
                if hi > lo:
                    llm.decode_embeddings(chunk[lo - pos :], ids=[(seg.key, j) for j in range(lo, hi)],
                                          logits="last" if (i == last and hi == n) else "none")  # fmt: skip
                    self.prefilled_tokens += hi - lo
                pos = hi
        return reuse

    def logits(self, text: str, *, audio=None, think: bool = False) -> np.ndarray:
        """Next-token logits [vocab] after the history plus a user turn (parity checks, scoring)."""
        model = self.model
        clips = [model._clip(a, overlap=False) for a in _as_list(audio)]
        user = Message("user", text + (THINK_SUFFIX if think else ""), n_audio=len(clips))
        full = render(model.template, self.messages + [user], add_generation_prompt=True)
        with model.lock:
            self._prefill(self.segments + self._turn(full[len(self.rendered) :], clips))
            return model.llm.last_logits()

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
        # before the lock (no KV touched): cached rows, or the encoder started (on a thread when
        # overlapping, so it runs while llama.cpp takes the text before the clip)
        clips = [model._clip(a, overlap=model.overlap) for a in _as_list(audio)]
        user = Message("user", text + (THINK_SUFFIX if opts.think else ""), n_audio=len(clips))
        full = render(model.template, self.messages + [user], add_generation_prompt=True)
        if not full.startswith(self.rendered):
            raise RuntimeError("the chat template does not render conversations incrementally")
        target = self.segments + self._turn(full[len(self.rendered) :], clips)
        with model.lock:
            t0 = time.perf_counter()
            reused = self._prefill(target)  # on failure the cache keeps a consistent prefix
            t_prefill = time.perf_counter() - t0
            prompt_end = llm.n_past
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
                    self._commit(full, target, prompt_end, user, reply, tokens, clips)
                else:  # interrupted: forget this turn (the cache keeps its prompt for a retry)
                    llm.truncate(prompt_end)
        t_end = time.perf_counter()
        n = len(tokens)
        decode_s = (t_last or t_end) - (t_first or t_end)  # sampling to the last token; the history update is not decoding
        timings = Timings(
            features_ms=sum(c.features_ms for c in clips),
            encoder_ms=sum(c.encoder_ms for c in clips),
            prefill_ms=t_prefill * 1000,
            first_token_ms=((t_first or t_end) - t_start) * 1000,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            audio_tokens=sum(len(c) for c in clips),
            prompt_tokens=prompt_end,
            reused_tokens=reused,
        )
        self.last_answer = Answer(text=reply, tokens=tuple(tokens), timings=timings)
        if box is not None:
            box.append(self.last_answer)

    def _commit(self, full: str, target: list, prompt_end: int, user: Message, reply: str, tokens: list[int],
                clips: list[_Clip]) -> None:  # fmt: skip
        """Put the finished turn in the history; the KV cache then holds exactly its segments.

        The reference re-tokenises the reply text on the next turn; when that differs from the
        sampled ids, only the reply is re-decoded (never the earlier prompt or the audio).
        """
        llm = self.model.llm
        self.messages = self.messages + [user, Message("assistant", reply)]
        rendered = render(self.model.template, self.messages, add_generation_prompt=False)
        canonical = llm.tokenize(rendered[len(full) :])
        keep = len(tokens) if canonical[: len(tokens)] == tokens else 0
        llm.truncate(prompt_end + keep)
        if canonical[keep:]:
            llm.decode_tokens(canonical[keep:], logits="none")
            self.prefilled_tokens += len(canonical) - keep
        self.rendered = rendered
        self.segments = target + [canonical]
