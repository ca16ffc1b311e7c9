"""Typed configuration of the `model`, `train`, `finetune` and `eval` sections (owned here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """A decoder LM described by a transformers config; the vocabulary comes from the tokenizer."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("llama", description="transformers model_type, e.g. llama, gpt2, qwen2, mistral")
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query heads; default = num_heads")
    intermediate_size: int = Field(688, ge=8)
    max_position_embeddings: int = Field(512, ge=8, description="context length")
    init_from: str | None = Field(None, description="initialise from this local Hugging Face folder")
    extra: dict[str, Any] = Field(default_factory=dict, description="passed through to the HF config")


class TrainConfig(BaseModel):
    """Ray Train scaling, DeepSpeed engine settings and the schedule of one pretraining run."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional CPUs leave room for Ray Data tasks")
    gpus_per_worker: float = Field(1.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker (default: cores/workers)")
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    micro_batch_size: int = Field(8, ge=1, description="blocks per worker per micro step")
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    lr: float = Field(1e-3, gt=0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(200, ge=1)
    activation_checkpointing: bool = False
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    num_to_keep: int | None = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1, description="-1 = retry forever")
    seed: int = 0
    peak_flops: float = Field(1e12, gt=0, description="per-worker peak FLOP/s for the MFU estimate")


class FinetuneConfig(BaseModel):
    """Supervised fine-tuning on prompt/response pairs (see jobs/finetune.py)."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(default_factory=list, description="jsonl pairs or chat messages; empty = demo pairs")
    base: str | None = Field(None, description="HF folder or raylm run to start from; default = this run's export")
    method: Literal["full", "lora"] = "full"
    max_steps: int = Field(150, ge=1)
    lr: float = Field(5e-4, gt=0, le=1.0)


class EvalConfig(BaseModel):
    """Held-out evaluation (see jobs/evaluate.py)."""

    model_config = ConfigDict(extra="forbid")

    max_examples: int = Field(64, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    min_exact_match: float | None = Field(None, ge=0, le=1, description="deploy gate; None = no gate")
