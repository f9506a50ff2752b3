"""The model behind the embedded backend: weights and vocabulary, loaded once.

Everything here is read-only after loading, so tokenizing is safe from any thread.
Also the process-wide llama.cpp set-up (once per process, its log routed to ours).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import llama_cpp

from .base import BackendError

logger = logging.getLogger(__name__)

_backend_ready = False
_backend_lock = threading.Lock()
# Special-token parsing turns these tokens' texts into the tokens (llama-vocab.cpp).
_PARSED_AS_CONTROL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN


def _forward_llama_log(level: int, text: bytes | None, user_data: int | None) -> None:
    # llama.cpp's info and debug output can echo token text: keep its warnings (3) and
    # errors (4) only (ggml_log_level).
    if level in (3, 4) and text:
        severity = logging.WARNING if level == 3 else logging.ERROR
        logger.log(severity, "llama.cpp: %s", text.decode(errors="replace").rstrip())


# ctypes must keep the callback object alive for as long as llama.cpp may call it.
_LLAMA_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(
    _forward_llama_log
)


def init_llama_backend() -> None:
    """Initialise llama.cpp once per process and route its log away from stderr."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_LLAMA_LOG_CALLBACK, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


class LlamaModel:
    """Weights and vocabulary, loaded once. Tokenizing is read-only, safe from any thread."""

    def __init__(self, path: str) -> None:
        init_llama_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        # No repacked weight buffers ("extra buffer types", e.g. AMX): a native build's AMX
        # kernels die with SIGILL on hosts that advertise AMX without enabling it, and exact
        # batching and resume are checked (tests/integration) with the plain CPU kernels.
        params.use_extra_bufts = False
        self.handle: Any = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.handle:
            raise BackendError(f"llama.cpp could not load {path}")
        self.vocab: Any = llama_cpp.llama_model_get_vocab(self.handle)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.end_of_generation = frozenset(
            token
            for token in range(self.n_vocab)
            if llama_cpp.llama_vocab_is_eog(self.vocab, token)
        )
        """Tokens that end a generation (end of turn, end of text, ...)."""
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, no BOS added (the template adds it). `parse_special`
        turns texts like `<|im_end|>` into control tokens: for template text only."""
        data = text.encode()
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buffer, capacity, False, parse_special
        )
        if n < 0:
            raise BackendError("tokenization failed")
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if n < 0:  # longer than 64 bytes: ask again with the size llama.cpp needs
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -n, 0, False)
            cached = self._pieces[token] = buffer.raw[: max(n, 0)]
        return cached

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(self.vocab, token)).decode(errors="replace")

    def special_tokens(self) -> tuple[str, str]:
        """(BOS text, EOS text), as chat templates expect them."""
        bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        return self.token_text(bos), self.token_text(eos)

    def bos_prefix(self) -> list[int]:
        """[BOS] if the model's vocabulary asks for one at the start of a prompt."""
        if not llama_cpp.llama_vocab_get_add_bos(self.vocab):
            return []
        return [int(llama_cpp.llama_vocab_bos(self.vocab))]

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self.handle, None)
        return bytes(template).decode() if template else None

    def is_end_of_generation(self, token: int) -> bool:
        return token in self.end_of_generation

    def control_texts(self) -> list[str]:
        """Texts that special-token parsing turns into control tokens (`<|im_end|>`)."""
        return [
            self.token_text(token)
            for token in range(self.n_vocab)
            if int(llama_cpp.llama_vocab_get_attr(self.vocab, token)) & _PARSED_AS_CONTROL
        ]

    def free(self) -> None:
        if self.handle:
            llama_cpp.llama_model_free(self.handle)
            self.handle = None


def read_chat_template(path: str) -> tuple[str | None, str, str]:
    """(chat template, BOS text, EOS text) of a GGUF file, reading its vocabulary only."""
    init_llama_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    handle = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not handle:
        raise BackendError(f"llama.cpp could not read {path}")
    try:
        template = llama_cpp.llama_model_chat_template(handle, None)
        vocab = llama_cpp.llama_model_get_vocab(handle)

        def text(token: int) -> str:
            return bytes(llama_cpp.llama_vocab_get_text(vocab, token)).decode(errors="replace")

        bos = text(int(llama_cpp.llama_vocab_bos(vocab)))
        eos = text(int(llama_cpp.llama_vocab_eos(vocab)))
        return (bytes(template).decode() if template else None), bos, eos
    finally:
        llama_cpp.llama_model_free(handle)
