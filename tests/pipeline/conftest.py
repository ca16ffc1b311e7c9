"""Fixtures of the fine-tuning, evaluation and pipeline tests: a small local tokenizer and tiny models.

Everything is built here from configs and a few sentences, so no test reaches a hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipelines.config import TokenizerConfig
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer

SENTENCES = [
    "How do I reset my password? Open settings and choose reset password.",
    "Where is my order? Track it from the orders page with your order number.",
    "Can I get a refund? Refunds are available within thirty days of purchase.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,?!'-",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (raylm's special tokens and chat template) trained on a few lines."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(SENTENCES * 20, TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=2), out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer, tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama saved as an HF folder with the tokenizer next to it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
