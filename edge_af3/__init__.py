"""edge-af3: NVIDIA Audio Flamingo 3 on edge devices.

The inference path (audio -> features -> encoder engine -> llama.cpp) needs no torch;
`edge_af3.reference` and `edge_af3.export` do, through the `export` extra.
"""

from .audio import Audio, AudioError, load_audio
from .features import AudioFeatures, AudioTooLongWarning, extract_features, token_count

__version__ = "0.1.0"

__all__ = [
    "Audio",
    "AudioError",
    "AudioFeatures",
    "AudioTooLongWarning",
    "extract_features",
    "load_audio",
    "token_count",
    "__version__",
]
