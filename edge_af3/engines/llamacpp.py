"""The LLM engine: llama.cpp through llama-cpp-python's low-level API.

A llama.cpp batch carries either token ids or float embeddings, so text and audio rows go in
separate `llama_decode` calls at consecutive positions. Every decode is cut to `n_batch` rows:
a larger one trips a C assert that aborts the whole process. The engine owns the context, the
batches, adapters and the vocabulary; each sequence's KV bookkeeping (positions, what they hold,
prefix reuse, truncation, removal with shift) is its `KVSequence` (engines/sequence.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..cpu_features import AMX_WHY, amx_path_would_run
from ..errors import BundleError, OptionsError
from ._native import NativeResource
from .pages import release_mapped_pages
from .sampling import SamplerOptions, SamplingMixin  # noqa: F401 - SamplerOptions: part of this module's API
from .sequence import KVSequence

_LOG_LOCK = threading.Lock()
_LOG = {"callback": None, "verbose": False}


def init_backend(verbose: bool = False):
    """Start llama.cpp's backend once per process and route its native log through one callback,
    silent unless `verbose` (the latest call decides). Returns that callback, for libraries of the
    same build that take a log callback of their own (libmtmd)."""
    import llama_cpp

    with _LOG_LOCK:
        if _LOG["callback"] is None:

            @llama_cpp.llama_log_callback
            def _cb(level, text, user_data):  # noqa: ARG001
                if _LOG["verbose"]:
                    os.write(2, text)

            _LOG["callback"] = _cb
            llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
        _LOG["verbose"] = verbose
        return _LOG["callback"]


def model_params(n_gpu_layers: int = 0, repack: bool = True):
    """llama.cpp's model parameters as every edge-af3 load sets them. A llama.cpp built with its
    AMX path (a native build on an AMX CPU, not what scripts/setup.sh builds) loads without extra
    buffer types: no AMX repacking (it crashes), and no CPU repacking either (slower; docs/cpu.md).
    `repack=False` does the same on any build (what that costs: benchmarks.bench_cpu's repack)."""
    import llama_cpp

    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    if not repack:
        mp.use_extra_bufts = False
    elif amx_path_would_run():
        mp.use_extra_bufts = False
        if not _LOG.get("amx_warned"):
            _LOG["amx_warned"] = True
            warnings.warn(
                f"this llama-cpp-python was built with AMX and {AMX_WHY}: loading without weight "
                "repacking (slower); rebuild it with scripts/setup.sh (docs/cpu.md)",
                RuntimeWarning,
                stacklevel=3,
            )
    return mp


def is_verbose() -> bool:
    return bool(_LOG["verbose"])


def supports_gpu_offload() -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU (a CUDA/Metal/Vulkan build)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}  # ggml_type ids


class LlamaEngine(SamplingMixin, NativeResource):
    """One llama.cpp model + context with `n_seq` sequences (`seqs`: KVSequence objects), each
    with its own KV cache of `n_ctx` positions (llama.cpp's non-unified multi-sequence KV). The
    decode_* / truncate / n_past shorthands act on sequence 0, the in-process runtime's."""

    def __init__(
        self,
        gguf: str | os.PathLike,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        threads: int | None = None,
        n_gpu_layers: int = 0,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        n_seq: int = 1,
        verbose: bool = False,
        release_pages: bool = True,
        repack: bool = True,
    ):
        import llama_cpp

        self._ll = llama_cpp
        init_backend(verbose)
        path = Path(gguf)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        mp = model_params(n_gpu_layers, repack)
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise BundleError(f"llama.cpp could not load {path} (not a GGUF it can read, or truncated)")
        # release_pages=False: the mapping as llama.cpp's own tools keep it (the benchmarks' peers)
        self.released_mb = release_mapped_pages(path) if (release_pages and n_gpu_layers == 0) else 0.0
        cp = llama_cpp.llama_context_default_params()
        if n_seq < 1:
            raise OptionsError(f"n_seq must be >= 1, got {n_seq}")
        cp.n_ctx = n_ctx * n_seq  # llama.cpp splits the total evenly between the sequences
        cp.n_seq_max = n_seq
        cp.kv_unified = False
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        n_threads = threads or max(1, os.cpu_count() or 1)
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.no_perf = True
        if kv_type not in KV_TYPES:
            raise OptionsError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        if flash_attn is not None:
            cp.flash_attn_type = 1 if flash_attn else 0
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx)  # positions per sequence
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._tok = llama_cpp.llama_batch_init(max(n_batch, n_seq), 0, 1)
        self._emb = llama_cpp.llama_batch_init(n_batch, self.n_embd, 1)
        self.n_gpu_layers = n_gpu_layers
        self.seqs = [KVSequence(self, i) for i in range(n_seq)]
        self.adapters: dict[str, object] = {}  # name -> llama_adapter_lora (freed with the model)
        self.active: str | None = None  # the adapter set on the context now
        # bumped by every change of the context's state (a decode, a truncation, another adapter):
        # a generation that saw the value after its own step knows the logits and KV are still its own
        self.epoch = 0
        self.decoded_rows = 0  # counters that tests read: work actually done
        self.decode_calls = 0

    # sequence 0, which the in-process runtime uses
    @property
    def n_past(self) -> int:
        return self.seqs[0].n_past

    def decode_tokens(self, ids: Sequence[int], *, logits: str = "last") -> np.ndarray | None:
        return self.seqs[0].decode_tokens(ids, logits=logits)

    def decode_embeddings(self, rows: np.ndarray, *, logits: str = "none", ids: Sequence | None = None):
        return self.seqs[0].decode_rows(rows, ids=ids, logits=logits)

    def decode_next(self, token: int) -> None:
        self.seqs[0].decode_next(token)

    def truncate(self, n_past: int) -> None:
        self.seqs[0].truncate(n_past)

    # -- decoding (KVSequence keeps its own bookkeeping) ------------------------------------
    def run_tokens(self, ids: Sequence[int], want_logits: str, seq: KVSequence) -> None:
        """One llama_decode of <= n_batch token ids at `seq`'s next positions."""
        for i, t in enumerate(ids):
            self._tok.token[i] = t
        self._run(self._tok, len(ids), want_logits, seq, ids)

    def run_rows(self, rows: np.ndarray, ids: Sequence, want_logits: str, seq: KVSequence) -> None:
        """One llama_decode of <= n_batch float rows (C-contiguous float32) at `seq`'s next positions."""
        ctypes.memmove(self._emb.embd, rows.ctypes.data, rows.nbytes)
        self._run(self._emb, rows.shape[0], want_logits, seq, ids)

    def _run(self, batch, n: int, want_logits: str, seq: KVSequence, items: Sequence) -> None:
        self.epoch += 1
        batch.n_tokens = n
        for i in range(n):
            batch.pos[i] = seq.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq.id
            batch.logits[i] = 1 if (want_logits == "all" or (want_logits == "last" and i == n - 1)) else 0
        self._decode(batch, seq.n_past)
        seq.advanced(items)
        self.decoded_rows += n

    def _decode(self, batch, at: int) -> None:
        rc = self._ll.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {at}")
        self.decode_calls += 1

    def decode_step(self, steps: Sequence[tuple[int, int]]) -> None:
        """One batched decode of one token per sequence: `steps` = (seq id, token) pairs, each token
        at its sequence's next position; the logits of pair i are at batch index i (`sample(s, i)`)."""
        if not steps or len(steps) > self.n_seq:
            raise ValueError(f"decode_step takes 1..{self.n_seq} (seq, token) pairs, got {len(steps)}")
        seqs = [self.seqs[s] for s, _ in steps]
        for seq in seqs:
            seq.check_room(1)
        batch = self._tok
        batch.n_tokens = len(steps)
        for i, (seq, (_, token)) in enumerate(zip(seqs, steps)):
            batch.token[i] = token
            batch.pos[i] = seq.n_past
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq.id
            batch.logits[i] = 1
        self.epoch += 1
        self._decode(batch, seqs[0].n_past)
        for seq, (_, token) in zip(seqs, steps):
            seq.advanced((token,))
        self.decoded_rows += len(steps)

    def logits_rows(self, n: int) -> np.ndarray:
        """The logits of the last decode's first n rows, copied: [n, vocab]."""
        out = np.empty((n, self.n_vocab), dtype=np.float32)
        for i in range(n):
            ptr = self._ll.llama_get_logits_ith(self.ctx, i)
            out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def last_logits(self, index: int = -1) -> np.ndarray:
        ptr = self._ll.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- the KV memory (a KVSequence calls these and keeps its bookkeeping) ------------------
    def memory_remove(self, seq: int, p0: int, p1: int) -> None:
        """Drop positions [p0, p1) of a sequence (p1 = -1: to the end)."""
        self._ll.llama_memory_seq_rm(self._ll.llama_get_memory(self.ctx), seq, p0, p1)
        self.epoch += 1

    def can_shift(self) -> bool:
        return bool(self._ll.llama_memory_can_shift(self._ll.llama_get_memory(self.ctx)))

    def memory_shift(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Move positions [p0, p1) of a sequence by `delta` (RoPE keys re-rotated at the next decode)."""
        if not self.can_shift():
            raise RuntimeError("this model's KV cache cannot shift positions")
        self._ll.llama_memory_seq_add(self._ll.llama_get_memory(self.ctx), seq, p0, p1, delta)
        self.epoch += 1

    def reset(self) -> None:
        self._ll.llama_memory_clear(self._ll.llama_get_memory(self.ctx), True)
        self.epoch += 1
        for seq in self.seqs:  # (the context's active adapter stays)
            seq.emptied()

    # -- adapters -------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a GGUF LoRA adapter (once); `activate(name)` switches to it."""
        if name in self.adapters:
            return
        ptr = self._ll.llama_adapter_lora_init(self.model, str(path).encode())
        if not ptr:
            raise BundleError(f"llama.cpp could not load the LoRA adapter {path} (not an adapter for this model?)")
        self.adapters[name] = ptr

    def activate(self, name: str | None) -> None:
        """Decode with adapter `name` (None: the base model) from now on; no reload, no copy."""
        if name == self.active:
            return
        ll = self._ll
        if name is None:
            rc = ll.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            if name not in self.adapters:
                raise OptionsError(f"no adapter {name!r} is loaded; loaded: {', '.join(self.adapters) or 'none'}")
            ptrs = (ll.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            rc = ll.llama_set_adapters_lora(self.ctx, ptrs, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed with code {rc}")
        self.active = name
        self.epoch += 1

    # -- vocabulary -----------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._ll.llama_token * cap)()
        n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            raise RuntimeError("llama_tokenize: buffer too small")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        ll = self._ll
        if getattr(self, "ctx", None):
            ll.llama_batch_free(self._tok)
            ll.llama_batch_free(self._emb)
            ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)
            self.model = None
