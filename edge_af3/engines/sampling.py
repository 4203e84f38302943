"""llama.cpp's sampler chain in transformers' order, as a mixin of `LlamaEngine` (it reads the
engine's `_ll`, `ctx`, `n_vocab` and `n_ctx`): the repetition penalty over the whole context, then
greedy, or temperature -> top-k -> top-p -> a seeded draw."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerOptions:
    """What `make_sampler` reads (a runtime `GenerationOptions` has the same fields)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0  # 1 = off


class SamplingMixin:
    def make_sampler(self, opts: SamplerOptions, *, final: bool = True):
        """A sampler chain in transformers' order: repetition penalty (whole-context window), then
        greedy, or temperature -> top-k -> top-p -> a seeded draw. final=False leaves out the
        last step (greedy / draw): the processed distribution a draw would see (the parity tests)."""
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if opts.repetition_penalty != 1.0:
            ll.llama_sampler_chain_add(
                chain, ll.llama_sampler_init_penalties(self.n_vocab, self.n_ctx, opts.repetition_penalty, 0.0, 0.0)
            )
        if opts.temperature <= 0:
            if final:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(opts.temperature))
        if opts.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(opts.top_k))
        if opts.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(opts.top_p, 1))
        if final:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(opts.seed & 0xFFFFFFFF))
        return chain

    def accept(self, sampler, tokens) -> None:
        """Tell the sampler about tokens it did not sample itself (the prompt, for the penalty).

        Each distinct id once: the chain's only stateful step is the repetition penalty, which
        (frequency and presence penalties 0) asks only whether an id occurred within its window of
        n_ctx tokens, and a prompt never outgrows that window. A 10-minute clip is 15 000 `<sound>`
        ids: one call instead of 15 000."""
        for t in dict.fromkeys(int(t) for t in tokens):
            self._ll.llama_sampler_accept(sampler, t)

    def sample(self, sampler, index: int = -1) -> int:
        """Sample from the logits of a row of the last decode (default its last; the sampler
        accepts the token)."""
        return int(self._ll.llama_sampler_sample(sampler, self.ctx, index))

    def free_sampler(self, sampler) -> None:
        self._ll.llama_sampler_free(sampler)
