"""GGUF metadata: a small GGUF written here with known values, and the real default model
checked against the stock ``gguf.GGUFReader``."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from pcrt.runtime.errors import ModelLoadError
from pcrt.runtime.models.gguf_info import read_gguf_info


def write_tiny_gguf(path: Path, *, tied: bool = False, template: bool = True) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if template:
        w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_token_list([f"t{i}" for i in range(16)])
    w.add_token_scores([0.0] * 16)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))  # 512 bytes
    for b in range(2):
        w.add_tensor(f"blk.{b}.attn_q.weight", np.zeros((8, 8), dtype=np.float16))  # 128
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.zeros((8,), dtype=np.float32))  # 32
    w.add_tensor("output_norm.weight", np.zeros((8,), dtype=np.float32))  # 32
    if not tied:
        w.add_tensor("output.weight", np.zeros((16, 8), dtype=np.float16))  # 256
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    info = read_gguf_info(path)
    assert info.architecture == "llama" and info.name == "tiny test"
    assert (info.block_count, info.context_length, info.embedding_length) == (2, 128, 8)
    assert (info.head_count, info.head_count_kv, info.feed_forward_length) == (2, 1, 16)
    assert (info.key_length, info.value_length) == (4, 4)  # derived: 8 / 2
    assert info.file_type == "MOSTLY_F16"
    assert info.tensor_types == {"F16": 3, "F32": 4} and info.tensor_count == 7
    assert info.parameter_count == 16 * 8 + 2 * (64 + 8) + 8 + 16 * 8
    assert info.vocab_size == 16
    assert info.has_chat_template and "messages" in (info.chat_template or "")
    assert not info.tied_embeddings
    tb = info.tensor_bytes
    assert (tb.per_block, tb.output, tb.token_embd, tb.other) == ((160, 160), 256, 512, 32)
    assert tb.total == 1120
    assert info.file_size == path.stat().st_size
    assert info.gguf_version == 3


def test_tied_and_templateless(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True, template=False)
    info = read_gguf_info(path)
    assert info.tied_embeddings and info.tensor_bytes.output == 0
    assert not info.has_chat_template and info.chat_template is None


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        read_gguf_info(path)


def test_default_model_matches_the_stock_reader(default_model_path: Path) -> None:
    start = time.perf_counter()
    info = read_gguf_info(default_model_path)
    elapsed = time.perf_counter() - start
    stock = gguf.GGUFReader(default_model_path)

    def field(key: str) -> object:
        return stock.fields[key].contents()

    assert info.architecture == field("general.architecture") == "llama"
    assert info.name == field("general.name")
    assert info.block_count == field("llama.block_count") == 30
    assert info.context_length == field("llama.context_length")
    assert info.embedding_length == field("llama.embedding_length") == 576
    assert info.head_count == field("llama.attention.head_count") == 9
    assert info.head_count_kv == field("llama.attention.head_count_kv") == 3
    assert info.chat_template == field("tokenizer.chat_template")
    assert info.vocab_size == len(stock.fields["tokenizer.ggml.tokens"].data) == 49152
    assert info.file_type == "MOSTLY_Q4_1"
    assert info.tensor_count == len(stock.tensors)
    assert info.parameter_count == sum(int(t.n_elements) for t in stock.tensors)
    assert info.tensor_bytes.total == sum(int(t.n_bytes) for t in stock.tensors)
    assert len(info.tensor_bytes.per_block) == 30
    assert info.tied_embeddings  # SmolLM2 shares the embedding matrix with the output head
    assert elapsed < 1.0, f"reading metadata took {elapsed:.2f}s"
