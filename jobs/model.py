"""Build the decoder LM from the typed model section, and count what the MFU estimate needs.

The architecture is whatever `transformers` knows by `model_type` (Llama by default); the vocabulary
size and special token ids always come from the run's tokenizer, so the embedding matrix, generation
config and tokenizer can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from jobs.config import ModelConfig


def hf_config(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int | None = None
) -> PretrainedConfig:
    """The transformers config of the model to train (from `init_from` when set, else from the section)."""
    if cfg.init_from:
        if not Path(cfg.init_from).is_dir():
            raise ValueError(f"model.init_from: {cfg.init_from!r} is not a local Hugging Face folder")
        return AutoConfig.from_pretrained(cfg.init_from, local_files_only=True)
    if seq_len is not None and seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"model.max_position_embeddings ({cfg.max_position_embeddings}) is shorter than "
            f"data.seq_len ({seq_len})"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"model.hidden_size ({cfg.hidden_size}) must be divisible by model.num_heads ({cfg.num_heads})"
        )
    kwargs: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": False,
        **cfg.extra,
    }
    try:
        return AutoConfig.for_model(cfg.arch, **kwargs)
    except ValueError as exc:
        raise ValueError(f"model.arch: {cfg.arch!r} is not a transformers model_type ({exc})") from None


def build_model(config: PretrainedConfig, init_from: str | None = None) -> torch.nn.Module:
    """A fresh model from `config`, or the weights of `init_from`; call inside `zero.Init` for ZeRO-3."""
    if init_from:
        return AutoModelForCausalLM.from_pretrained(
            init_from, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def count_params(model: torch.nn.Module) -> int:
    """Parameter count, also under ZeRO-3 where each rank holds only a partition (`ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


@dataclass(frozen=True)
class FlopsSpec:
    """What PaLM appendix B needs: N parameters, L layers, H heads, Q head dim, T sequence length."""

    num_params: int
    num_layers: int
    num_heads: int
    head_dim: int
    seq_len: int

    @classmethod
    def of(cls, config: PretrainedConfig | None, num_params: int, seq_len: int) -> FlopsSpec:
        """From a transformers config (standard attribute names; attention term 0 when unknown)."""
        heads = getattr(config, "num_attention_heads", 0) or 0
        hidden = getattr(config, "hidden_size", 0) or 0
        layers = getattr(config, "num_hidden_layers", 0) or 0
        return cls(num_params, layers, heads, hidden // heads if heads else 0, seq_len)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the dense matmuls + 12·L·H·Q·T for attention."""
        return 6.0 * self.num_params + 12.0 * self.num_layers * self.num_heads * self.head_dim * self.seq_len
