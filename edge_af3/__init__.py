"""edge-af3: NVIDIA Audio Flamingo 3 on edge devices.

The inference path (audio -> features -> encoder engine -> llama.cpp) needs no torch;
`edge_af3.reference` and `edge_af3.export` do, through the `export` extra.
"""

from .audio import Audio, AudioError, load_audio
from .bundle import Bundle, BundleError, open_bundle
from .features import AudioFeatures, AudioTooLongWarning, extract_features, token_count
from .runtime import AF3, Answer, ChatSession, GenerationOptions, ModelNotFoundError, Timings

__version__ = "0.1.0"

__all__ = [
    "AF3",
    "Answer",
    "Bundle",
    "BundleError",
    "ChatSession",
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
