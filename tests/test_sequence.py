"""A llama.cpp sequence's KV bookkeeping (engines/sequence.py) against transformers.

Removing a range of positions and shifting the later ones back (what a rolling audio memory does
when it forgets its oldest window) is checked against transformers' own cache: the reference
runs the prompt, drops the same entries from its `DynamicCache`, turns the kept later keys back
by the same distance with the model's rotary embedding, and reads the question from there. (The
later positions' KV were computed attending to the removed ones, in both: that is what eviction
means; it is not a fresh prefill of the shorter prompt, and the test shows the difference.)"""

from __future__ import annotations

import numpy as np
import pytest

from edge_af3.engines.llamacpp import LlamaEngine


def reference_logits(reference, pieces: list) -> np.ndarray:
    """transformers' last-position logits over token id lists and float rows, in order."""
    import torch

    m = reference.model
    embed = m.get_input_embeddings()
    with torch.inference_mode():
        parts = [
            embed(torch.tensor([p])) if isinstance(p, list) else torch.from_numpy(p)[None].to(embed.weight.dtype)
            for p in pieces
        ]
        out = m(inputs_embeds=torch.cat(parts, dim=1))
    return out.logits[0, -1].float().numpy()


def evicted_reference_logits(reference, prefix: list, drop: tuple[int, int], question: list[int]) -> np.ndarray:
    """transformers: run `prefix` (id lists and rows), remove cache positions [a, b), rotate the
    keys after them back by b - a, then the question's last logits at the shifted positions."""
    import torch
    from transformers import DynamicCache
    from transformers.models.qwen2.modeling_qwen2 import rotate_half

    m = reference.model
    embed = m.get_input_embeddings()
    a, b = drop
    with torch.inference_mode():
        parts = [
            embed(torch.tensor([p])) if isinstance(p, list) else torch.from_numpy(p)[None].to(embed.weight.dtype)
            for p in prefix
        ]
        x = torch.cat(parts, dim=1)
        past = m(inputs_embeds=x, use_cache=True).past_key_values
        n = x.shape[1]
        rope = m.model.language_model.rotary_emb
        cos, sin = rope(x, torch.full((1, n - b), -(b - a)))
        kept = []
        for layer in past.layers:
            k, v = layer.keys, layer.values  # [1, kv heads, n, head dim]
            moved = k[:, :, b:] * cos[:, None] + rotate_half(k[:, :, b:]) * sin[:, None]
            kept.append((torch.cat([k[:, :, :a], moved], 2), torch.cat([v[:, :, :a], v[:, :, b:]], 2)))
        start = n - (b - a)
        out = m(
            inputs_embeds=embed(torch.tensor([question])),
            cache=DynamicCache(kept),
            position_ids=torch.arange(start, start + len(question))[None],
            use_cache=True,
        )
    return out.logits[0, -1].float().numpy()


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    gguf = next(tiny_bundle.glob("llm-*.gguf"))  # an F32 LLM
    with LlamaEngine(gguf, n_ctx=512, n_batch=32, threads=2, kv_type="f32", flash_attn=False) as e:
        yield e


@pytest.fixture(scope="module")
def pieces(engine, reference):
    """A system prompt, two 'windows' of audio-like rows (embeddings of random ids plus noise,
    longer than n_batch) and a question."""
    import torch

    rng = np.random.default_rng(3)
    table = reference.model.get_input_embeddings().weight
    with torch.inference_mode():
        rows = [
            table[torch.from_numpy(rng.integers(0, 151000, n))].float().numpy()
            + rng.normal(0, 0.01, (n, engine.n_embd)).astype(np.float32)
            for n in (45, 40)
        ]
    system = engine.tokenize("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    question = engine.tokenize("What did you hear last?<|im_end|>\n<|im_start|>assistant\n")
    return system, rows[0], rows[1], question


def test_removing_a_window_equals_transformers_evicting_it(engine, reference, pieces):
    system, first, second, question = pieces
    seq = engine.seqs[0]
    seq.truncate(0)
    seq.decode_tokens(system, logits="none")
    seq.decode_rows(first, ids=[("w1", i) for i in range(len(first))])
    seq.decode_rows(second, ids=[("w2", i) for i in range(len(second))])
    seq.remove(len(system), len(system) + len(first))  # forget the first window
    assert seq.n_past == len(system) + len(second) == len(seq.items)
    assert seq.items[len(system)] == ("shifted", ("w2", 0))  # never a fresh prompt's prefix again
    assert seq.common_prefix(system + [("w2", i) for i in range(len(second))]) == len(system)
    got = seq.decode_tokens(question, logits="last")

    drop = (len(system), len(system) + len(first))
    want = evicted_reference_logits(reference, [system, first, second], drop, question)
    err = np.abs(got - want).max()
    assert err <= 1e-3, err
    # the comparison can tell: the prompt that still holds the first window, and a fresh prefill
    # of the prompt without it, each read differently
    for other in ([system, first, second, question], [system, second, question]):
        assert np.abs(reference_logits(reference, other) - want).max() > 50 * err


def test_a_hole_without_the_shift_would_not_match(engine, reference, pieces):
    """What the shift is for: removing the range but leaving the later positions where they were
    (a gap) gives logits the reference does not (RoPE reads the gap as distance)."""
    system, first, second, question = pieces
    seq = engine.seqs[0]
    seq.truncate(0)
    seq.decode_tokens(system, logits="none")
    seq.decode_rows(first)
    seq.decode_rows(second)
    engine.memory_remove(seq.id, len(system), len(system) + len(first))  # no shift
    got = seq.decode_tokens(question, logits="last")
    drop = (len(system), len(system) + len(first))
    want = evicted_reference_logits(reference, [system, first, second], drop, question)
    assert np.abs(got - want).max() > 1e-2
    seq.truncate(0)


def test_remove_bookkeeping_and_bad_ranges(engine):
    seq = engine.seqs[0]
    seq.truncate(0)
    ids = engine.tokenize("one two three four five six seven eight")
    seq.decode_tokens(ids, logits="none")
    for bad in ((-1, 2), (3, 2), (0, len(ids) + 1)):
        with pytest.raises(ValueError, match="cannot remove"):
            seq.remove(*bad)
    assert seq.items == ids
    seq.remove(2, 2)  # nothing
    assert seq.items == ids
    seq.remove(len(ids) - 2, len(ids))  # the tail: a truncation
    assert seq.items == ids[:-2] and seq.n_past == len(ids) - 2
    seq.remove(0, 3)
    assert seq.items == [("shifted", t) for t in ids[3:-2]] and seq.common_prefix(ids[3:]) == 0
    epoch = engine.epoch
    seq.truncate(0)
    assert engine.epoch > epoch and seq.n_past == 0 and seq.items == []
