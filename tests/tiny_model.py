"""A tiny GGUF that llama.cpp really loads, with the dimensions a test chooses.

A 2-layer llama of zero weights and no tokenizer (``tokenizer.ggml.model = "none"`` with
a ``vocab_size``: llama.cpp then makes dummy tokens). It loads in milliseconds, so an
``Engine`` can be built on a shape no real model here has, such as key/value heads wider
than ``n_embd / n_head`` (Gemma 3's are 256). ``tests/test_gguf_info.py`` writes GGUFs
the same way for the metadata reader.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["write_tiny_llama"]


def write_tiny_llama(
    path: Path,
    *,
    n_embd: int = 8,
    n_head: int = 2,
    n_head_kv: int = 1,
    head_dim: int | None = None,
    n_layer: int = 2,
    n_ff: int = 16,
    n_vocab: int = 16,
    context: int = 128,
) -> Path:
    """Write the model; ``head_dim`` sets ``llama.attention.key_length`` and
    ``value_length`` (llama's output projection needs them equal), None leaves them out."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(context)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("none")
    w.add_vocab_size(n_vocab)
    hd = head_dim if head_dim is not None else n_embd // n_head

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)  # numpy order: rows are ggml's ne[1]

    w.add_tensor("token_embd.weight", zeros(n_vocab, n_embd))
    for b in range(n_layer):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{b}.attn_q.weight", zeros(n_head * hd, n_embd))
        w.add_tensor(f"blk.{b}.attn_k.weight", zeros(n_head_kv * hd, n_embd))
        w.add_tensor(f"blk.{b}.attn_v.weight", zeros(n_head_kv * hd, n_embd))
        w.add_tensor(f"blk.{b}.attn_output.weight", zeros(n_embd, n_head * hd))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{b}.ffn_gate.weight", zeros(n_ff, n_embd))
        w.add_tensor(f"blk.{b}.ffn_up.weight", zeros(n_ff, n_embd))
        w.add_tensor(f"blk.{b}.ffn_down.weight", zeros(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", zeros(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
