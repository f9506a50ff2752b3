"""One llama.cpp context: a KV cache with one stream per sequence, and its batch.

Only the engine thread touches it. Its settings are what makes batching exact: one KV
stream per sequence (`kv_unified` off) and ubatches below the tiled-attention threshold
(`EXACT_UBATCH`), so a token's logits do not depend on which other sequences share its
batch nor on how its prompt was cut into chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import llama_cpp

from .base import BackendError
from .llama_model import LlamaModel
from .step_plan import EXACT_UBATCH


class BatchPart(Protocol):
    """One sequence's consecutive tokens in a batch."""

    @property
    def seq_id(self) -> int: ...
    @property
    def start(self) -> int: ...  # position of the first token
    @property
    def tokens(self) -> Sequence[int]: ...
    @property
    def sample(self) -> bool: ...  # the logits of its last token are wanted

    logits_index: int  # set by `decode`: where those logits are


class LlamaContext:
    def __init__(
        self, model: LlamaModel, slots: int, context_per_slot: int, batch_size: int, threads: int
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * context_per_slot
        params.n_seq_max = slots
        params.n_batch = batch_size
        params.n_ubatch = EXACT_UBATCH
        params.n_threads = params.n_threads_batch = threads
        # One KV stream per sequence (kv_unified off): batched decoding then gives
        # bit-identical logits to decoding each sequence alone, which exact resume and
        # reproducible seeds rely on. The engine's seq id compaction pays the price.
        params.kv_unified = False
        params.no_perf = True
        self.handle: Any = llama_cpp.llama_init_from_model(model.handle, params)
        if not self.handle:
            raise BackendError("llama.cpp could not create a context")
        assert int(llama_cpp.llama_n_ctx_seq(self.handle)) >= context_per_slot
        self._memory: Any = llama_cpp.llama_get_memory(self.handle)
        self._batch: Any = llama_cpp.llama_batch_init(batch_size, 0, 1)

    def decode(self, parts: Sequence[BatchPart]) -> int:
        """Decode `parts` in one llama_decode; its status (0 = done)."""
        batch = self._batch
        tokens, positions, n_seq_ids = batch.token, batch.pos, batch.n_seq_id
        seq_ids, wants_logits = batch.seq_id, batch.logits
        i = 0
        for part in parts:
            seq_id = part.seq_id
            for offset, token in enumerate(part.tokens):
                tokens[i] = token
                positions[i] = part.start + offset
                n_seq_ids[i] = 1
                seq_ids[i][0] = seq_id
                wants_logits[i] = 0
                i += 1
            if part.sample:
                wants_logits[i - 1] = 1
                part.logits_index = i - 1
        batch.n_tokens = i
        return int(llama_cpp.llama_decode(self.handle, batch))

    def forget(self, seq_id: int, start: int = -1) -> None:
        """Drop the sequence's KV entries from position `start` on (-1: all of them)."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, start, -1)

    def move(self, source: int, target: int) -> None:
        """Give sequence `source`'s KV stream to seq id `target` (a copy of the stream)."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, source, -1, -1)

    def free(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.handle)
        self._batch = self.handle = self._memory = None
