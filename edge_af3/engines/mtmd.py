"""llama.cpp's own multimodal path (libmtmd, through `llama_cpp.mtmd_cpp`) on an AF3 mmproj.

Not edge-af3's runtime: llama.cpp's AF3 audio path differs from the model (global log-mel max, no
padding mask, an extra all-padding window for a clip of exactly 30 s, an extra `<sound>` text
token). It is here as a peer for the benchmarks and to check the `--mmproj` files we write.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from ._native import NativeResource
from .llamacpp import LlamaEngine

MARKER = "<__media__>"


def _quiet_mtmd_logs() -> None:
    """Route libmtmd's logging through the same switch as llama.cpp's (silent unless verbose)."""
    from llama_cpp import mtmd_cpp

    from .llamacpp import init_backend, is_verbose

    mtmd_cpp.mtmd_helper_log_set(init_backend(is_verbose()), ctypes.c_void_p(0))


class MtmdAudio(NativeResource):
    """An mmproj loaded by libmtmd next to a `LlamaEngine`'s model; prompts carry `MARKER` per clip."""

    def __init__(
        self, mmproj: str | os.PathLike, engine: LlamaEngine, *, threads: int | None = None, use_gpu: bool = False
    ):
        from llama_cpp import mtmd_cpp

        self._m = mtmd_cpp
        _quiet_mtmd_logs()
        path = Path(mmproj)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such mmproj file")
        self.engine = engine
        p = mtmd_cpp.mtmd_context_params_default()
        p.use_gpu = use_gpu
        p.print_timings = False
        p.n_threads = threads or max(1, os.cpu_count() or 1)
        p.media_marker = MARKER.encode()
        p.warmup = False
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), engine.model, p)
        if not self.ctx:
            raise RuntimeError(f"libmtmd could not load {path}")
        if not mtmd_cpp.mtmd_support_audio(self.ctx):
            self.close()
            raise RuntimeError(f"{path} has no audio encoder")
        self.sample_rate = int(mtmd_cpp.mtmd_get_audio_sample_rate(self.ctx))

    def _chunks(self, text: str, audios: list[np.ndarray]):
        m = self._m
        bitmaps = []
        for a in audios:
            a = np.ascontiguousarray(a, dtype=np.float32)
            bm = m.mtmd_bitmap_init_from_audio(a.size, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            if not bm:
                raise RuntimeError("libmtmd could not take the audio")
            bitmaps.append(bm)
        chunks = m.mtmd_input_chunks_init()
        try:
            data = text.encode("utf-8")
            inp = m.mtmd_input_text(text=data, text_len=len(data), add_special=False, parse_special=True)
            arr = (m.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                m.mtmd_input_chunks_free(chunks)
                raise RuntimeError(f"mtmd_tokenize failed with code {rc}")
        finally:
            for bm in bitmaps:
                m.mtmd_bitmap_free(bm)
        return chunks

    def _encode(self, chunk) -> np.ndarray:
        """libmtmd's projected rows [n_tokens, n_embd] of one audio chunk (a view of its buffer)."""
        m = self._m
        n = m.mtmd_input_chunk_get_n_tokens(chunk)
        if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        ptr = m.mtmd_get_output_embd(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.engine.n_embd,)).reshape(n, self.engine.n_embd)

    def audio_rows(self, audio: np.ndarray) -> np.ndarray:
        """The projected rows libmtmd makes of one clip at 16 kHz: [n_tokens, n_embd] (all its windows)."""
        m = self._m
        chunks = self._chunks(MARKER, [audio])
        try:
            out = []
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_AUDIO:
                    continue
                out.append(self._encode(chunk).copy())
            return np.concatenate(out)
        finally:
            m.mtmd_input_chunks_free(chunks)

    def prefill(self, text: str, audios: list[np.ndarray]) -> dict:
        """Tokenize, encode and decode a whole prompt as llama-mtmd-cli does (libmtmd's chunks in order,
        audio chunks encoded by libmtmd, every decode cut to n_batch); logits of the last row are kept.
        Returns token counts and the time spent in each stage."""
        m, eng = self._m, self.engine
        t0 = time.perf_counter()
        chunks = self._chunks(text, audios)  # libmtmd computes its log-mel here
        t1 = time.perf_counter()
        encode_s = 0.0
        try:
            n = m.mtmd_input_chunks_size(chunks)
            eng.seqs[0].check_room(m.mtmd_helper_get_n_tokens(chunks))
            counts = {"tokens": 0, "audio_tokens": 0}
            for i in range(n):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                last = "last" if i == n - 1 else "none"
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    k = ctypes.c_size_t(0)
                    ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(k))
                    eng.decode_tokens(ptr[: k.value], logits=last)
                    counts["tokens"] += k.value
                    continue
                te = time.perf_counter()
                rows = self._encode(chunk)
                encode_s += time.perf_counter() - te
                eng.decode_embeddings(rows, logits=last)
                counts["tokens"] += rows.shape[0]
                counts["audio_tokens"] += rows.shape[0]
        finally:
            m.mtmd_input_chunks_free(chunks)
        t2 = time.perf_counter()
        return {
            **counts,
            "features_ms": (t1 - t0) * 1000,
            "encoder_ms": encode_s * 1000,
            "prefill_ms": (t2 - t1 - encode_s) * 1000,
        }

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._m.mtmd_free(self.ctx)
            self.ctx = None
