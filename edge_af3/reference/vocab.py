"""The real Qwen2 BPE vocabulary for test checkpoints, fetched reproducibly from PyPI.

No model weights (and so no tokenizer.json from the Hub) can be downloaded here, but llama.cpp's
test vocabulary `models/ggml-vocab-qwen2.gguf` ships inside the llama-cpp-python sdist: the
151 643 byte-level BPE tokens and 151 387 merges of Qwen2/Qwen2.5. We take that file (checked by
sha256) and write HF tokenizer files from it, adding Qwen2.5's and AF3's special tokens at their
real ids, so token ids in our tests are the ids the real AF3 uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..bundle import sha256_file
from ..constants import BOS_TOKEN_ID, EOS_TOKEN, PAD_TOKEN_ID, SOUND_TOKEN, SOUND_TOKEN_ID, VOCAB_SIZE
from ..paths import cache_dir

SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
VOCAB_SHA256 = "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c"
N_BPE_TOKENS = 151_643  # ids 0..151642 are plain BPE tokens

# Qwen2's pre-tokenizer split (the same regex llama.cpp uses for `pre = qwen2`).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens from id 151643 on. Qwen2.5 owns 151643-151664; AF3 adds 151665-151671.
# The names of 151665-151668 follow NVIDIA's VILA lineage (AF3 never emits them); the ids the
# model uses (<sound>, BOS, PAD, <|im_end|>) are the real ones, checked against constants.py.
SPECIAL_TOKENS: list[tuple[str, bool]] = [  # (content, special)
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    (EOS_TOKEN, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<vila/sentinel>", True),
    ("<image>", True),
    ("<vila/video>", True),
    ("<speech>", True),
    (SOUND_TOKEN, True),
    ("[BOS]", True),
    ("[PAD]", True),
]
assert N_BPE_TOKENS + len(SPECIAL_TOKENS) == VOCAB_SIZE
assert SPECIAL_TOKENS[SOUND_TOKEN_ID - N_BPE_TOKENS][0] == SOUND_TOKEN
assert SPECIAL_TOKENS[BOS_TOKEN_ID - N_BPE_TOKENS][0] == "[BOS]"
assert SPECIAL_TOKENS[PAD_TOKEN_ID - N_BPE_TOKENS][0] == "[PAD]"


def _extract(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.getmember(SDIST_MEMBER)
        src = tar.extractfile(member)
        if src is None:
            raise RuntimeError(f"{sdist}: {SDIST_MEMBER} is not a regular file")
        tmp = dest.with_suffix(".partial")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
    if sha256_file(tmp) != VOCAB_SHA256:
        tmp.unlink()
        raise RuntimeError(f"{sdist}: {SDIST_MEMBER} does not have the expected sha256 {VOCAB_SHA256}")
    os.replace(tmp, dest)


def qwen2_vocab_path() -> Path:
    """Path of `ggml-vocab-qwen2.gguf`, fetched from PyPI's llama-cpp-python sdist on first use.

    `EDGE_AF3_LLAMA_SDIST` may name an sdist already on disk (CI downloads it once to build
    llama-cpp-python and reuses it here).
    """
    dest = cache_dir() / "vocab" / "ggml-vocab-qwen2.gguf"
    if dest.exists() and sha256_file(dest) == VOCAB_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = os.environ.get("EDGE_AF3_LLAMA_SDIST")
    if local:
        _extract(Path(local), dest)
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            SDIST_REQUIREMENT,
            "-d",
            tmp,
        ]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"could not download {SDIST_REQUIREMENT} for the Qwen2 vocabulary: {e.stderr.strip()[-500:]}\n"
                "Set EDGE_AF3_LLAMA_SDIST to a downloaded llama_cpp_python-0.3.36.tar.gz."
            ) from e
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if len(sdists) != 1:
            raise RuntimeError(f"pip download of {SDIST_REQUIREMENT} gave {sdists}")
        _extract(sdists[0], dest)
    return dest


def read_qwen2_vocab(path: Path | None = None) -> tuple[list[str], list[str]]:
    """(tokens[0:151643], merges) in byte-level form, read from the GGUF vocabulary."""
    import gguf

    reader = gguf.GGUFReader(str(path or qwen2_vocab_path()))
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tokens = [tokens_field.contents(i) for i in range(N_BPE_TOKENS)]
    if any(t != 1 for t in types[:N_BPE_TOKENS]):
        raise RuntimeError("unexpected token types in the Qwen2 vocabulary")
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    return tokens, list(merges)


def special_tokens(renamed: dict[int, str] | None = None) -> list[tuple[str, bool]]:
    """The special tokens, with some ids under other names (Music Flamingo's tokenizer calls 151670
    and 151671 `<|sound_bos|>` and `<|sound_eos|>`)."""
    names = renamed or {}
    return [(names.get(N_BPE_TOKENS + i, c), s) for i, (c, s) in enumerate(SPECIAL_TOKENS)]


def tokenizer_json(tokens: list[str], merges: list[str], renamed: dict[int, str] | None = None) -> dict:
    """A `tokenizers` JSON document for Qwen2's byte-level BPE plus the special tokens."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [
        {
            "id": N_BPE_TOKENS + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (content, special) in enumerate(special_tokens(renamed))
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def write_tokenizer(
    out: Path, chat_template: str, model_max_length: int = 32768, renamed: dict[int, str] | None = None
) -> None:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json into `out`."""
    tokens, merges = read_qwen2_vocab()
    out = Path(out)
    doc = tokenizer_json(tokens, merges, renamed)
    (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), "utf-8")
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    decoder = {
        str(N_BPE_TOKENS + i): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s,
        }
        for i, (c, s) in enumerate(special_tokens(renamed))
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
