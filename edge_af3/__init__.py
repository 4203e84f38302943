"""edge-af3: NVIDIA Audio Flamingo 3 on edge devices.

The inference path (audio -> features -> encoder engine -> llama.cpp) needs no torch;
`edge_af3.reference` and `edge_af3.export` do, through the `export` extra.
"""

from .audio import Audio, load_audio
from .bundle import Bundle, open_bundle
from .errors import (
    AudioError,
    BundleError,
    CheckpointError,
    ContextOverflowError,
    EdgeAF3Error,
    ModelNotFoundError,
    OptionsError,
)
from .features import AudioFeatures, AudioTooLongWarning, extract_features, token_count
from .runtime import AF3, Answer, ChatSession, GenerationOptions, Memory, Stream, Timings

__version__ = "0.1.0"

__all__ = [
    "AF3",
    "Answer",
    "Bundle",
    "BundleError",
    "ChatSession",
    "CheckpointError",
    "ContextOverflowError",
    "EdgeAF3Error",
    "Memory",
    "OptionsError",
    "Stream",
    "GenerationOptions",
    "ModelNotFoundError",
    "Timings",
    "open_bundle",
    "Audio",
    "AudioError",
    "AudioFeatures",
    "AudioTooLongWarning",
    "extract_features",
    "load_audio",
    "token_count",
    "__version__",
]
