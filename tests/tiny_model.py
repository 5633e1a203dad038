"""Tiny GGUFs that llama.cpp really loads, with the dimensions a test chooses.

A 2-layer llama of zero weights and no tokenizer (``tokenizer.ggml.model = "none"`` with
a ``vocab_size``: llama.cpp then makes dummy tokens). It loads in milliseconds, so an
``Engine`` can be built on a shape no real model here has, such as key/value heads wider
than ``n_embd / n_head`` (Gemma 3's are 256). ``tests/test_gguf_info.py`` writes GGUFs
the same way for the metadata reader.

A tiny Gemma 3 the same way, whose KV cache is llama.cpp's sliding-window kind (iSWA:
``llama_model_n_swa > 0``), for what a model without a plain KV cache does. It can also
generate: it has llama.cpp's dummy "test" tokenizer, where "none" aborts the process as
soon as the engine turns a sampled token into text.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["write_tiny_gemma3", "write_tiny_llama"]


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
    _finish(w)
    return path


def write_tiny_gemma3(
    path: Path,
    *,
    n_layer: int = 2,
    sliding_window: int = 32,
    sliding_window_pattern: int = 2,
    context: int = 256,
    n_embd: int = 8,
    n_head: int = 2,
    n_head_kv: int = 1,
    head_dim: int = 4,
    n_ff: int = 16,
    n_vocab: int = 16,
) -> Path:
    """Write a ``gemma3`` model whose layers attend through a window of ``sliding_window``
    tokens, except every ``sliding_window_pattern``-th (llama.cpp's rule: layer ``i`` slides
    when ``i % pattern < pattern - 1``; Gemma 3's own is 6, which would make both of two
    layers slide). The default 2 layers are then one sliding, one global, as in Gemma 3."""
    if sliding_window <= 0:
        raise ValueError("sliding_window must be positive: 0 turns llama.cpp's iSWA cache off")
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(n_layer)
    w.add_context_length(context)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)  # global layers; the sliding ones use the next
    w.add_rope_freq_base_swa(10_000.0)
    w.add_sliding_window(sliding_window)
    w.add_sliding_window_pattern(sliding_window_pattern)
    # llama.cpp's "test" tokenizer, not "none": the engine decodes each sampled token to
    # text, and llama.cpp aborts the process on that for a "none" vocabulary. "test" needs
    # only the token list (a token's text is its id in hex: token 10's is "a"; no BOS or
    # EOS, so only max_tokens ends a generation)
    w.add_tokenizer_model("test")
    w.add_token_list([f"<t{i}>" for i in range(n_vocab)])

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)  # numpy order: rows are ggml's ne[1]

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    w.add_tensor("token_embd.weight", zeros(n_vocab, n_embd))  # also the output (tied)
    for b in range(n_layer):
        w.add_tensor(f"blk.{b}.attn_norm.weight", ones(n_embd))
        w.add_tensor(f"blk.{b}.attn_q.weight", zeros(n_head * head_dim, n_embd))
        w.add_tensor(f"blk.{b}.attn_k.weight", zeros(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"blk.{b}.attn_v.weight", zeros(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"blk.{b}.attn_q_norm.weight", ones(head_dim))
        w.add_tensor(f"blk.{b}.attn_k_norm.weight", ones(head_dim))
        w.add_tensor(f"blk.{b}.attn_output.weight", zeros(n_embd, n_head * head_dim))
        w.add_tensor(f"blk.{b}.post_attention_norm.weight", ones(n_embd))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", ones(n_embd))
        w.add_tensor(f"blk.{b}.ffn_gate.weight", zeros(n_ff, n_embd))
        w.add_tensor(f"blk.{b}.ffn_up.weight", zeros(n_ff, n_embd))
        w.add_tensor(f"blk.{b}.ffn_down.weight", zeros(n_embd, n_ff))
        w.add_tensor(f"blk.{b}.post_ffw_norm.weight", ones(n_embd))
    w.add_tensor("output_norm.weight", ones(n_embd))
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
