"""`AF3`: an exported bundle loaded — one encoder engine and one llama.cpp context, owned together."""

from __future__ import annotations

import contextlib
import os
import threading

from ..audio import load_audio
from ..bundle import Bundle, open_bundle
from ..constants import MIN_TOKEN_SAMPLES, SAMPLE_RATE, THINK_SUFFIX
from ..engines.llamacpp import LlamaEngine
from ..engines.select import EncoderChoice, make_encoder
from ..errors import AudioError, BundleError, OptionsError
from ..family import Family
from ..settings import Settings, resolve
from .clips import Clip, RowsCache
from .encoding import ClipEncoder
from .locate import locate
from .session import ChatSession
from .stream import Stream
from .types import Answer, GenerationOptions, eos_ids


def _as_list(audio) -> list:
    if audio is None:
        return []
    return audio if isinstance(audio, list) else [audio]


class AF3:
    """An exported AF3 bundle, loaded. `ask`/`stream` one question; `chat()` a conversation.

    Generations interleave step by step (see `Stream`); one llama.cpp context serves them all,
    and its KV prefix is reused across questions, sessions and streams.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        n_ctx: int | None = None,
        threads: int | None = None,
        kv_type: str | None = None,
        flash_attn: bool | None = None,
        exact: bool = False,
        encoder_engine: str | None = None,
        windows_per_run: int | None = None,
        overlap: bool | None = None,
        n_gpu_layers: int | None = None,
        n_batch: int = 512,
        cache_size: int = 16,
        options: GenerationOptions | None = None,
        n_seq: int = 1,
    ):
        self.bundle = bundle
        self.template = bundle.manifest.get("chat_template")
        if not self.template:
            raise BundleError(f"{bundle.path}: the manifest has no chat template")
        self.generation: dict = dict(bundle.manifest.get("generation") or {})  # the checkpoint's defaults
        self.eos_ids = eos_ids(self.generation)
        self.family = Family.from_manifest(bundle.manifest)  # AF3, Music Flamingo or AF-Next
        n_ctx = self.family.n_ctx if n_ctx is None else n_ctx  # room for the family's longest clip
        encoder_engine = self.family.encoder_engine(encoder_engine)  # Music Flamingo: ONNX Runtime
        self.options = options or GenerationOptions()  # this model's defaults; a call's own options win
        stored = bundle.manifest["encoder"]["precision"]
        ask = dict(
            device=device,
            encoder_engine=encoder_engine,
            kv_type=kv_type,
            flash_attn=flash_attn,
            n_ctx=n_ctx,
            windows_per_run=windows_per_run,
            overlap=overlap,
            n_gpu_layers=n_gpu_layers,
            exact=exact,
            timed=self.family.time_embedding,
        )
        settings = resolve(stored, **ask)  # probes the GPU and engines once; its choice is reused below
        self._stack = contextlib.ExitStack()
        try:
            choice = EncoderChoice(
                settings.encoder_engine, settings.device_used, gpu=settings.gpu, skipped=settings.skipped
            )
            self.encoder, self.engine_choice = make_encoder(
                bundle, choice, threads=threads, fallback=encoder_engine is None, fp32=exact, timed=ask["timed"]
            )
            self._stack.callback(self.encoder.close)
            if self.engine_choice.engine != settings.encoder_engine:  # a GPU engine failed to start
                settings = resolve(stored, **ask, choice=self.engine_choice)
            self.settings: Settings = settings
            self.llm = self._stack.enter_context(
                LlamaEngine(
                    bundle.llm,
                    n_ctx=settings.n_ctx,
                    n_batch=n_batch,
                    threads=threads,
                    kv_type=settings.kv_type,
                    flash_attn=settings.flash_attn,
                    n_gpu_layers=settings.n_gpu_layers,
                    n_seq=n_seq,
                )
            )
            if self.llm.n_embd != bundle.hidden_size:
                raise BundleError(f"{bundle.path}: LLM width {self.llm.n_embd} != encoder rows {bundle.hidden_size}")
            self.adapters: dict = dict(bundle.manifest.get("adapters") or {})  # name -> its manifest entry
            for name, entry in self.adapters.items():
                self.llm.load_adapter(name, bundle.path / entry["lora"]["file"])
        except BaseException:
            self._stack.close()
            raise
        self.lock = threading.RLock()  # the llama.cpp context: one prefill or decode step at a time
        self._encoder_lock = threading.Lock()  # one encoder run at a time (CUDA graphs share buffers)
        self.rows_cache = RowsCache(cache_size)
        self._threads = threads
        self._variant_encoders: dict[str, object] = {}  # adapter -> the encoder with its weights (lazy)
        self._claimed: set[int] = set()  # sequences an audio memory owns
        self.closed = False

    @property
    def windows_per_run(self) -> int:
        return self.settings.windows_per_run

    @property
    def overlap(self) -> bool:
        return self.settings.overlap

    @classmethod
    def load(
        cls,
        source: str | os.PathLike,
        *,
        check_hashes: bool | None = None,
        quant: str = "auto",
        encoder_precision: str = "auto",
        progress=None,
        **settings,
    ) -> AF3:
        """Load a bundle; a checkpoint folder or Hub id is exported once into the cache, then reused.

        settings: device ("auto" | "cpu" | "cuda"), n_ctx (default: the model's longest prompt: 16384
        for AF3, 31744 Music Flamingo, 47104 AF-Next), threads, kv_type ("f16" | "q8_0" | "f32"),
        flash_attn (default: on with a GPU, off on a CPU), exact (f32 KV, flash attention off:
        greedy tokens equal transformers'), encoder_engine, windows_per_run, overlap, n_gpu_layers,
        options (a `GenerationOptions`: this model's defaults over the checkpoint's), n_seq (llama.cpp
        sequences, each with its own n_ctx of KV cache: the server's slots; the in-process API uses
        the first).
        check_hashes: None hashes files the first time they are seen (remembered), True always,
        False never. quant / encoder_precision: how a checkpoint source is exported; quant "auto":
        the type its widths suit, F32 in exact mode; encoder_precision "auto": fp32 for exact mode,
        on a GPU machine or a CPU without VNNI, else mixed. Each combination is its own cached
        bundle.
        """
        from ..quants import checked_encoder_precision, exact_quant

        exact = bool(settings.get("exact"))
        precision = checked_encoder_precision(encoder_precision, exact=exact)
        quant = exact_quant(quant, exact)
        path = locate(source, quant=quant, encoder_precision=precision, progress=progress)
        return cls(open_bundle(path, check_hashes=check_hashes), **settings)

    @staticmethod
    def connect(base_url: str, api_key: str | None = None, model: str | None = None, **kwargs):
        """A model behind an OpenAI-compatible server (`edge-af3 serve`, or vLLM serving
        nvidia/audio-flamingo-3-hf) with the same ask / stream / chat calls (extra `client`)."""
        from ..client import RemoteAF3

        return RemoteAF3(base_url, api_key=api_key, model=model, **kwargs)

    @property
    def label(self) -> str:
        return str(self.bundle.path)

    # -- adapters ---------------------------------------------------------------------------
    def resolve_adapter(self, think: bool = False, adapter: str | None = None) -> tuple[str | None, str]:
        """(the adapter a request runs with, its prompt suffix). think=True: the bundle's `think`
        adapter when it has one (AF3's think mode as shipped), always AF3's think suffix."""
        if adapter is not None and adapter not in self.adapters:
            raise OptionsError(f"this bundle has no adapter {adapter!r}; it has: {', '.join(self.adapters) or 'none'}")
        name = adapter or ("think" if think and "think" in self.adapters else None)
        suffix = THINK_SUFFIX if think else (self.adapters[name].get("prompt_suffix", "") if name else "")
        return name, suffix

    def encoder_variant(self, adapter: str | None) -> str | None:
        """The adapter whose encoder weights make the rows (None: the base encoder's rows serve)."""
        return adapter if adapter and (self.adapters[adapter].get("encoder") or None) else None

    def _encoder_for(self, variant: str | None):
        if variant is None:
            return self.encoder
        enc = self._variant_encoders.get(variant)
        if enc is None:  # ONNX Runtime with the adapter's initializers over the shared encoder.onnx
            import numpy as np

            from ..engines.select import onnx_encoder

            entry = self.adapters[variant]["encoder"]
            with np.load(self.bundle.path / entry["file"], allow_pickle=False) as npz:
                overrides = {k: npz[k] for k in npz.files}
            enc = onnx_encoder(self.engine_choice.engine, self.bundle, self._threads, overrides)
            self._stack.callback(enc.close)
            self._variant_encoders[variant] = enc
        return enc

    # -- audio ------------------------------------------------------------------------------
    def clips(self, audio, variant: str | None = None) -> list[Clip]:
        """Clips for `audio` (None, one clip or a list), rows from the cache where the same samples
        were seen; nothing is encoded yet. Refuses audio too short to give one audio token."""
        out = []
        for a in _as_list(audio):
            clip = load_audio(a, limit=self.family.max_samples, model=self.family.name)
            n = clip.samples.shape[0]
            if n < MIN_TOKEN_SAMPLES:
                raise AudioError(
                    f"{clip.name}: clip too short: {n} samples at {SAMPLE_RATE} Hz; AF3 needs at least "
                    f"{MIN_TOKEN_SAMPLES} ({MIN_TOKEN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms) for one audio token"
                )
            c = Clip(clip, variant=variant)
            c.rows = self.rows_cache.get(c.key)
            out.append(c)
        return out

    def encode(self, clip: Clip, *, background: bool = False) -> None:
        """Give a pending clip its rows: encoded now, or on a thread (`background`) that the
        prefill reads chunk by chunk. A clip with rows (cached) is left as it is."""
        if clip.pending:
            enc = ClipEncoder(
                self._encoder_for(clip.variant),
                self.settings.windows_per_run,
                self._encoder_lock,
                self.rows_cache,
                timed=self.family.time_embedding,
            )
            enc.start(clip) if background else enc.encode(clip)

    def audio_rows(self, audio):
        """Projected rows [N, H] for one clip; the same samples are encoded only once."""
        (clip,) = self.clips(audio)
        self.encode(clip)
        return clip.rows

    def forget(self) -> None:
        """Drop every cached clip and the KV cache (the next question starts cold)."""
        with self.lock:
            self.rows_cache.clear()
            self.llm.reset()

    # -- questions --------------------------------------------------------------------------
    def stream(
        self,
        prompt: str,
        audio=None,
        *,
        think: bool = False,
        adapter: str | None = None,
        options: GenerationOptions | None = None,
        **overrides,
    ) -> Stream:
        """A `Stream` of the answer to one question: iterate it for text; `.answer` when done;
        `.cancel()`. Arguments as `ChatSession.stream`."""
        return self.chat().stream(prompt, audio, think=think, adapter=adapter, options=options, **overrides)

    def ask(
        self,
        prompt: str,
        audio=None,
        *,
        think: bool = False,
        adapter: str | None = None,
        options: GenerationOptions | None = None,
        speak: bool | str = False,
        **overrides,
    ) -> Answer:
        """The whole `Answer` (text, tokens, timings, finish_reason) to one question about `audio`;
        speak: said on the sound card as it is written (`ChatSession.ask`)."""
        return self.chat().ask(prompt, audio, think=think, adapter=adapter, options=options, speak=speak, **overrides)

    def chat(self, system: str | None = None) -> ChatSession:
        return ChatSession(self, system)

    # -- the audio memory -------------------------------------------------------------------
    def memory(self, seconds: float = 600.0, **options):
        """A `Memory` of the last `seconds` (<= 600) of a stream of audio, kept in the KV cache:
        `feed(samples)` as they are heard, `ask(question)` at the cost of a text question
        (runtime/memory.py; docs/memory.md). options: system, tail_every (seconds between
        re-encodings of the window in progress; None: held until full), skip_silence, silence_db,
        exact (re-prefill after each eviction on a second sequence), directory (every window's
        rows on disk, for `ask(at=...)`), max_new_tokens (sizing). It takes a sequence of its own
        when the model has a free one (`n_seq` >= 2; exact mode needs one more), else shares
        the model's: a question asked outside it then displaces it until its next window."""
        from .memory import Memory

        return Memory(self, seconds, **options)

    def claim_sequence(self, *, required: bool = False):
        """A llama.cpp sequence for an audio memory: the last free one (the server's slots take
        the first ones), else (not `required`) the model's shared sequence 0."""
        free = [i for i in range(self.llm.n_seq - 1, 0, -1) if i not in self._claimed]
        if not free:
            if required:
                raise OptionsError(
                    "an exact memory needs two llama.cpp sequences of its own: load the model with "
                    f"n_seq >= {max(3, len(self._claimed) + 2)}"
                )
            return self.llm.seqs[0]
        self._claimed.add(free[0])
        return self.llm.seqs[free[0]]

    def release_sequence(self, seq) -> None:
        """A claimed sequence given back, its KV emptied (the shared one is left as it is)."""
        if seq.id in self._claimed:
            with self.lock:
                if not self.closed:
                    seq.truncate(0)
            self._claimed.discard(seq.id)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the encoder and the LLM (idempotent)."""
        if not getattr(self, "closed", True):
            with self.lock:
                self._stack.close()
                self.closed = True

    def __enter__(self) -> AF3:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
