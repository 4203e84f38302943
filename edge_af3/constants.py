"""Every number of AF3's audio path, in one place and derived from each other.

The values follow transformers' `AudioFlamingo3Processor` (>= 5.5) and
`WhisperFeatureExtractor(feature_size=128)`; see docs/architecture.md.
"""

from __future__ import annotations

SAMPLE_RATE = 16_000  # Hz, the only rate the encoder understands
N_FFT = 400  # 25 ms analysis window
HOP_LENGTH = 160  # 10 ms between frames
N_MELS = 128  # AF-Whisper uses 128 mel bins (Whisper large-v3 style)
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480_000 samples in one 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3_000 mel frames in one window
CONV_FRAMES = N_FRAMES // 2  # 1_500 frames after the stride-2 conv
ROWS_PER_WINDOW = CONV_FRAMES // 2  # 750 rows after AvgPool1d(2)
MAX_WINDOWS = 20  # AF3 reads at most 10 minutes
MAX_SAMPLES = MAX_WINDOWS * N_SAMPLES  # 9_600_000 samples = 600 s
LOG_FLOOR = 1e-10  # log10(max(x, 1e-10))
DYNAMIC_RANGE = 8.0  # clamp to (per-window max - 8)

# Special tokens of the AF3 tokenizer (Qwen2.5 vocabulary + AF3's additions).
SOUND_TOKEN = "<sound>"
SOUND_TOKEN_ID = 151669
BOS_TOKEN_ID = 151670
PAD_TOKEN_ID = 151671
EOS_TOKEN = "<|im_end|>"
EOS_TOKEN_ID = 151645
ENDOFTEXT_ID = 151643  # <|endoftext|>: the second eos of generation_config.json, and its bos/pad
VOCAB_SIZE = 151672

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
THINK_SUFFIX = "\nPlease think and reason about the input audio before you respond."
ASR_PROMPT = "Transcribe the input speech."


MIN_TOKEN_SAMPLES = 2 * HOP_LENGTH + 1  # 321 samples = 3 mel frames: the shortest clip with one audio token


def conv_length(mel_frames: int) -> int:
    """Frames after the stride-2 conv for `mel_frames` valid mel frames."""
    return (mel_frames - 1) // 2 + 1


def rows_for_frames(mel_frames: int) -> int:
    """Audio tokens (pooled encoder rows) for `mel_frames` valid mel frames."""
    return (conv_length(mel_frames) - 2) // 2 + 1


DEFAULT_MAX_NEW_TOKENS = 500  # the model card's setting
# the default context holds AF3's largest prompt: 15 000 audio rows (600 s), the chat template and a
# question, and a default-length answer
DEFAULT_N_CTX = 16_384
MIN_N_CTX = 256  # llama.cpp's smallest context
