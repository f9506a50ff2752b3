"""One sequence's sampling: llama.cpp's native sampler chain, never Python over the logits.

The chain applies, in vLLM's order: no end of generation before `min_tokens` (a logit bias
of -inf on every end-of-generation token, removed once enough tokens are out), repetition
penalty, frequency and presence penalties, temperature, top-k, top-p, then the draw
(greedy at temperature 0).

Resume: a preempted sequence gets a new sampler, fed the output it had produced, so that
penalties and `min_tokens` count it; the draw for output token n uses a seed that depends
only on (seed, n). A seeded request thus gives the same text with or without preemptions.

Penalty windows, as OpenAI and vLLM define them: frequency and presence penalties count
the output only; the repetition penalty counts prompt and output (vLLM's rule), with one
llama.cpp penalties sampler for each window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import llama_cpp

from .base import SamplingParams
from .llama_model import LlamaModel

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A 32-bit seed for drawing output token `position` (splitmix64 finaliser).

    Depending only on (seed, position) makes a seeded request give the same text whether
    or not it was preempted and resumed.
    """
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    # 0xFFFFFFFF is LLAMA_DEFAULT_SEED, which llama.cpp replaces by a random seed.
    return min(z & 0xFFFFFFFF, 0xFFFFFFFE)


class SequenceSampler:
    """The sampler chain of one sequence, resumed after `history` (its output so far)."""

    def __init__(
        self,
        sampling: SamplingParams,
        model: LlamaModel,
        seed: int,
        prompt: Sequence[int],
        history: Sequence[int],
    ) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain: Any = llama_cpp.llama_sampler_chain_init(params)
        self._seed = seed
        self._stochastic = sampling.temperature > 0
        self._min_tokens = sampling.min_tokens
        self._holds_eog = len(history) < sampling.min_tokens
        if self._holds_eog:
            self._add(_ban(model.n_vocab, model.end_of_generation))
        self._add_penalties(sampling, model.n_vocab, prompt)
        if self._stochastic:
            self._add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            if sampling.top_k > 0:
                self._add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            if sampling.top_p < 1.0:
                self._add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            self._add(llama_cpp.llama_sampler_init_dist(position_seed(seed, len(history))))
        else:
            self._add(llama_cpp.llama_sampler_init_greedy())
        for token in history:  # resumed output counts for the penalties
            llama_cpp.llama_sampler_accept(self._chain, token)

    def _add_penalties(self, sampling: SamplingParams, n_vocab: int, prompt: Sequence[int]) -> None:
        if sampling.repetition_penalty != 1.0:
            window = len(prompt) + max(sampling.max_tokens, 1)
            repetition = llama_cpp.llama_sampler_init_penalties(
                n_vocab, window, sampling.repetition_penalty, 0.0, 0.0
            )
            for token in prompt:  # only this sampler sees the prompt
                llama_cpp.llama_sampler_accept(repetition, token)
            self._add(repetition)
        if sampling.frequency_penalty or sampling.presence_penalty:
            # OpenAI penalises every token generated so far: the window is the whole output.
            window = max(sampling.max_tokens, 1)
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, window, 1.0, sampling.frequency_penalty, sampling.presence_penalty
                )
            )

    def _add(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, ctx: Any, batch_index: int, position: int) -> int:
        """Draw output token number `position` from the logits at `batch_index`."""
        if self._holds_eog and position >= self._min_tokens:
            llama_cpp.llama_sampler_free(llama_cpp.llama_sampler_chain_remove(self._chain, 0))
            self._holds_eog = False
        if self._stochastic:
            last = int(llama_cpp.llama_sampler_chain_n(self._chain)) - 1
            llama_cpp.llama_sampler_free(llama_cpp.llama_sampler_chain_remove(self._chain, last))
            self._add(llama_cpp.llama_sampler_init_dist(position_seed(self._seed, position)))
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, batch_index))

    def free(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def _ban(n_vocab: int, tokens: frozenset[int]) -> Any:
    """A logit-bias sampler that makes `tokens` impossible."""
    biases = (llama_cpp.llama_logit_bias * len(tokens))(
        *(llama_cpp.llama_logit_bias(token, -math.inf) for token in sorted(tokens))
    )
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(tokens), biases)
