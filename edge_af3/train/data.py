"""Training data: a JSONL file, one example per line, checked whole before training starts.

    {"audio": "clips/a.wav", "prompt": "Is the tone high or low?", "answer": "low"}
    {"messages": [{"role": "user", "content": "What is it?", "audio": "b.wav"},
                  {"role": "assistant", "content": "A dog."},
                  {"role": "user", "content": "And now?", "audio": ["c.wav", "d.wav"]},
                  {"role": "assistant", "content": "Rain."}]}

Relative audio paths are taken from the JSONL file's folder. The loss covers every assistant
message (its text and the `<|im_end|>` that ends it), nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audio import load_audio
from ..constants import MIN_TOKEN_SAMPLES, SOUND_TOKEN
from ..errors import AudioError, DataError  # noqa: F401 - DataError: importable from here
from ..features import extract_features
from ..prompt import Message, render


@dataclass
class Turn:
    role: str
    text: str
    audio: list[Path]


@dataclass
class Example:
    line: int
    turns: list[Turn]


def _audio_list(value, base: Path, where: str) -> list[Path]:
    items = [] if value is None else value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise DataError(f"{where}: 'audio' must be a path or a list of paths")
        path = (base / item).expanduser() if not Path(item).expanduser().is_absolute() else Path(item).expanduser()
        if not path.is_file():
            raise DataError(f"{where}: audio file {item} not found")
        out.append(path)
    return out


def read_examples(path: str | Path) -> list[Example]:
    """Every line parsed and checked (JSON, fields, audio files that exist and decode, non-empty
    answers); the first bad line is refused with its number and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    base = path.parent
    examples = []
    for n, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{where}: 'messages' must be a non-empty list")
            turns = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                    raise DataError(f"{where}: messages[{i}] needs a role of system, user or assistant")
                if not isinstance(m.get("content"), str):
                    raise DataError(f"{where}: messages[{i}].content must be a string")
                if m["role"] != "user" and m.get("audio"):
                    raise DataError(f"{where}: messages[{i}]: only user messages carry audio")
                turns.append(Turn(m["role"], m["content"], _audio_list(m.get("audio"), base, where)))
        else:
            for field in ("prompt", "answer"):
                if not isinstance(obj.get(field), str):
                    raise DataError(f"{where}: needs '{field}' (a string), or 'messages'")
            turns = [
                Turn("user", obj["prompt"], _audio_list(obj.get("audio"), base, where)),
                Turn("assistant", obj["answer"], []),
            ]
        if turns[-1].role != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        if any(not t.text.strip() for t in turns if t.role == "assistant"):
            raise DataError(f"{where}: every assistant answer must be non-empty (nothing to learn otherwise)")
        for t in turns:
            for a in t.audio:
                try:
                    clip = load_audio(a)
                except AudioError as e:
                    raise DataError(f"{where}: {e}") from None
                if clip.samples.shape[0] < MIN_TOKEN_SAMPLES:
                    raise DataError(f"{where}: {a.name} is too short for one audio token")
        examples.append(Example(n, turns))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def encode_example(ex: Example, template: str, tokenizer, sound_id: int) -> dict:
    """input_ids / labels / audio features of one example, as AF3's processor lays them out:
    each clip's `<sound>` expanded to its audio token count, features of all clips in order."""
    feats, counts = [], []
    for t in ex.turns:
        for a in t.audio:
            f = extract_features(a)
            feats.append(f)
            counts.append(f.n_tokens)
    ids, labels = [], []
    msgs = [Message(t.role, t.text, n_audio=len(t.audio)) for t in ex.turns]
    done, k = "", 0
    for i, m in enumerate(msgs):
        text = render(template, msgs[: i + 1], add_generation_prompt=False)
        piece = text[len(done) :]
        if not text.startswith(done):
            raise DataError(f"line {ex.line}: the chat template does not render conversations incrementally")
        if m.role == "assistant":  # the header is context, the answer and its <|im_end|> are the target
            head = render(template, msgs[:i], add_generation_prompt=True)[len(done) :]
            h = tokenizer(head, add_special_tokens=False)["input_ids"]
            body = tokenizer(piece[len(head) :], add_special_tokens=False)["input_ids"]
            ids += h + body
            trailing = 1 if body and tokenizer.decode(body[-1:]) == "\n" else 0  # the newline after <|im_end|>
            labels += [-100] * len(h) + body[: len(body) - trailing] + [-100] * trailing
        else:
            for j, part in enumerate(piece.split(SOUND_TOKEN)):
                if j:
                    ids += [sound_id] * counts[k]
                    labels += [-100] * counts[k]
                    k += 1
                toks = tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
                ids += toks
                labels += [-100] * len(toks)
        done = text
    out = {"input_ids": np.array([ids], np.int64), "labels": np.array([labels], np.int64)}
    if feats:
        out["input_features"] = np.concatenate([f.features for f in feats]).astype(np.float32)
        out["input_features_mask"] = np.concatenate([f.mask for f in feats]).astype(np.int64)
    return out
