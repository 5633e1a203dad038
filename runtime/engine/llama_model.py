"""A GGUF model loaded through llama.cpp's C API: weights, vocabulary, tokenizer.

Thin typed wrappers over the ctypes functions of llama-cpp-python, so that the engine
reads as engine logic. The model (weights) is shared by every context made from it.

Which threads: the tokenizer (``tokenize``, ``token_bound``) only reads the vocabulary,
which llama.cpp never changes after loading (``llama_vocab::impl::tokenize`` is a const
method that builds its working state per call, and llama-server tokenizes in its HTTP
threads while its main loop decodes), so any thread may tokenize while the scheduler
thread decodes. ``piece`` and ``is_eog`` fill caches and belong to the scheduler thread.
No thread may use the model once ``close`` has freed it (the engine makes sure).
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import llama_cpp

from pcrt.runtime.engine.bounds import NO_BOUND, TokenBound
from pcrt.runtime.errors import ModelLoadError

__all__ = ["LlamaModel", "TooManyTokens", "ensure_backend", "quiet_llama_logs"]

# the tokenizers that keep every character of their input in some token's piece (bounds)
_BOUNDED_VOCABS = (llama_cpp.LLAMA_VOCAB_TYPE_SPM, llama_cpp.LLAMA_VOCAB_TYPE_BPE)
_STRIPS = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP


class TooManyTokens(Exception):
    """A text takes more tokens than the caller allowed (``count``: how many it takes)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"the text takes {count} tokens")
        self.count = count


log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def ensure_backend() -> None:
    """llama_backend_init once per process (cached: calling it again is harmless anyway)."""
    llama_cpp.llama_backend_init()


@lru_cache(maxsize=1)
def quiet_llama_logs() -> Any:
    """Route llama.cpp's own chatter to Python logging at DEBUG (it is very talkative).

    The callback object must stay alive as long as the process: lru_cache keeps it.
    """

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, _user: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    return _callback


class LlamaModel:
    """Weights plus vocabulary of one GGUF file."""

    def __init__(
        self,
        path: Path,
        *,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: tuple[float, ...] | None = None,
    ) -> None:
        ensure_backend()
        quiet_llama_logs()
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.main_gpu = main_gpu
        if tensor_split:
            # llama.cpp reads up to llama_max_devices() floats; the array must outlive the
            # load call, so it is kept on the object
            n = max(len(tensor_split), int(llama_cpp.llama_max_devices()))
            self._tensor_split = (ctypes.c_float * n)(*tensor_split)
            params.tensor_split = self._tensor_split
        self.path = path
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load {path} (not a GGUF it understands?)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.ptr))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.ptr))
        self.n_layer = int(llama_cpp.llama_model_n_layer(self.ptr))
        self.n_head = int(llama_cpp.llama_model_n_head(self.ptr))
        self.n_head_kv = int(llama_cpp.llama_model_n_head_kv(self.ptr))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}  # logprobs show special tokens too
        self._is_eog: dict[int, bool] = {}
        self.token_bound = self._token_bound()

    # -- metadata ---------------------------------------------------------------------

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text (llama.cpp's ``llama_model_meta_val_str``); None
        when the file does not have the key."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # longer than the buffer: llama.cpp says how long
            buf = ctypes.create_string_buffer(n + 1)
            n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        """A special token's text (e.g. ``<|im_end|>``), for chat templates."""
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", "replace")

    @property
    def size_bytes(self) -> int:
        return int(llama_cpp.llama_model_size(self.ptr))

    # -- tokens -----------------------------------------------------------------------

    def tokenize(
        self,
        text: str,
        *,
        add_special: bool = True,
        parse_special: bool = True,
        at_most: int | None = None,
    ) -> list[int]:
        """The text's tokens. ``at_most``: a text that takes more raises ``TooManyTokens``
        without its tokens ever becoming a Python list (llama.cpp only counts them)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        if at_most is not None:
            capacity = min(capacity, at_most + 1)
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0 and at_most is not None and -n > at_most:
            raise TooManyTokens(-n)
        if n < 0:  # buffer too small: llama.cpp says how many it needs
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        if n < 0:
            raise ModelLoadError("llama.cpp failed to tokenize the text")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a generated token contributes to the output (special tokens: none)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = self._piece(token, special=False)
        return cached

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes as logprobs show them: a special token by its text."""
        cached = self._special_pieces.get(token)
        if cached is None:
            cached = self._special_pieces[token] = self._piece(token, special=True)
        return cached

    def special_token(self, text: str) -> int | None:
        """The token that ``text`` is, when it is one token a grammar must name as special
        (llguidance's rule: a control token, or an added one written ``<...>``); else None.
        Call formats use it: Qwen's ``<tool_call>`` is such a token, SmolLM2 has none."""
        tokens = self.tokenize(text, add_special=False, parse_special=True)
        if len(tokens) != 1:
            return None
        attr = llama_cpp.llama_vocab_get_attr(self.vocab, tokens[0])
        spelled = text.startswith("<") and text.endswith(">")
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL or (
            attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and spelled
        ):
            return tokens[0]
        return None

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        cached = self._is_eog.get(token)
        if cached is None:
            cached = self._is_eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return cached

    def _token_bound(self) -> TokenBound:
        """The vocabulary's longest piece and whether it strips whitespace (``bounds``);
        one pass over the vocabulary at load (45 ms for SmolLM2's 49,152 tokens)."""
        if llama_cpp.llama_vocab_type(self.vocab) not in _BOUNDED_VOCABS:
            return NO_BOUND
        buf = ctypes.create_string_buffer(256)
        longest, strips = 0, False
        for token in range(self.n_vocab):
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            longest = max(longest, abs(n))  # negative: longer than the buffer, by that much
            strips = strips or bool(llama_cpp.llama_vocab_get_attr(self.vocab, token) & _STRIPS)
        return TokenBound(longest_piece=longest, strips_whitespace=strips)

    def _piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None
