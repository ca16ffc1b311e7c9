"""The small random-weight Llama the serving benchmarks serve: one builder, so they measure one model.

A raylm tokenizer is trained on the vendored tinyshakespeare (no downloads) and saved with the model
as an HF folder that `serve` loads like any exported run. Defaults are ARCHITECTURE.md's 4-layer,
256-wide model that `serve_load.py` measures; `serve_gpu_check.py` asks for a larger one with
grouped-query attention and a wide `initializer_range` (logits far apart, so bf16 batch-shape noise
cannot flip a greedy choice); the serving tests' fixture (`tests/serve/conftest.py`) a smaller one.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "third_party" / "tinyshakespeare" / "tinyshakespeare.txt"


def build_tiny_llama(
    out: Path,
    *,
    hidden: int = 256,
    layers: int = 4,
    intermediate: int = 688,
    heads: int | None = None,
    kv_heads: int | None = None,
    context: int = 512,
    initializer_range: float = 0.02,
    vocab_size: int = 2048,
    corpus: Path = CORPUS,
    corpus_chars: int = 300_000,
) -> Path:
    """Write a random Llama and its tokenizer (BPE of `vocab_size`, trained on the first `corpus_chars`
    of `corpus`) to `out`. `heads` None: heads of 64 dims; `kv_heads` None: one per head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_pipelines.config import TokenizerConfig
    from data_pipelines.tokenizer import load_tokenizer, train_tokenizer

    text = corpus.read_text(encoding="utf-8")[:corpus_chars]
    train_tokenizer(
        [text[i : i + 2000] for i in range(0, len(text), 2000)], TokenizerConfig(vocab_size=vocab_size), out
    )
    tok = load_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads or hidden // 64,
        num_key_value_heads=kv_heads or heads or hidden // 64,
        intermediate_size=intermediate,
        max_position_embeddings=context,
        initializer_range=initializer_range,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out
