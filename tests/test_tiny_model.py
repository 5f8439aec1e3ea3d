"""The tiny-model builder is deterministic for a seed, caches its output and has a chat template."""
from __future__ import annotations

import hashlib

from mooncake_connector.testing import ModelSpec, build_tiny_model

SMALL = ModelSpec(hidden_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
                  intermediate_size=256, vocab_size=512, max_position_embeddings=1024)


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights_and_tokenizer(tmp_path):
    a = build_tiny_model(SMALL, seed=7, cache_dir=tmp_path / "a")
    b = build_tiny_model(SMALL, seed=7, cache_dir=tmp_path / "b")
    c = build_tiny_model(SMALL, seed=8, cache_dir=tmp_path / "c")
    assert _digest(a) == _digest(b) != _digest(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_cached_build_is_reused(tmp_path):
    first = build_tiny_model(SMALL, seed=1, cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = build_tiny_model(SMALL, seed=1, cache_dir=tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == mtime


def test_tokenizer_round_trips_and_has_a_chat_template(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = build_tiny_model(SMALL, seed=1, cache_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    text = "Hello world, the moon cake cache."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|user|>hi</s><|assistant|>"
    config = AutoConfig.from_pretrained(path)
    assert config.head_dim == 64 and config.num_hidden_layers == 1
