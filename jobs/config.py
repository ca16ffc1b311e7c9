"""Typed configuration of the `model`, `train`, `finetune` and `eval` sections (owned here)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from data_pipelines.config import DataConfig, TokenizerConfig


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


class ScheduleConfig(BaseModel):
    """The optimisation schedule `train` and `finetune` share: one definition, so the two cannot drift.

    Both sections inherit these fields (same YAML keys, same attributes); `finetune` only changes some
    defaults. Fine-tuning takes the rest of the engine setup from `train` (see FinetuneConfig).
    """

    model_config = ConfigDict(extra="forbid")

    micro_batch_size: int = Field(8, ge=1, description="blocks (finetune: rows) per worker per micro step")
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(200, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = Field(0, description="model init and the per-epoch data shuffle (data.shuffle)")


class TrainConfig(ScheduleConfig):
    """Ray Train scaling, DeepSpeed engine settings and the schedule of one pretraining run."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional CPUs leave room for Ray Data tasks")
    gpus_per_worker: float = Field(1.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per worker (default: cores / workers on the node)"
    )
    zero_stage: Literal[0, 1, 2, 3] = 3
    zero3_param_persistence_threshold: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="ZeRO-3: parameters of at most this many elements stay whole on every worker "
        "(DeepSpeed's stage3_param_persistence_threshold); auto = 5e7 on CPU, each and in all (a small "
        "model is kept whole, gradients and optimizer state stay partitioned), DeepSpeed's 1e5 on GPU"
    )
    zero3_leaf_modules: Literal["auto", "layers", "none"] = Field(
        "auto", description="ZeRO-3 hooks: layers = one fetch/release per transformer block instead of per "
        "Linear/Norm (fewer hooks a step); auto = layers on CPU, none (DeepSpeed's default) on GPU"
    )
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    grad_clip: float = Field(1.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    activation_checkpointing: bool = False
    num_to_keep: int | None = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1, description="-1 = retry forever")
    shuffle_buffer_blocks: int = Field(
        2048, ge=1, description="blocks each worker's local shuffle buffer holds (memory: n x seq_len x 4 B)"
    )
    peak_flops: float = Field(1e12, gt=0, description="per-worker peak FLOP/s for the MFU estimate")
    optimizer_impl: Literal["auto", "torch", "torch_fused", "deepspeed_fused"] = Field(
        "auto", description="AdamW kernel: auto = DeepSpeed's fused Adam on GPU (CPU Adam when offloading), "
        "torch.optim.AdamW on CPU; torch_fused = torch's fused CUDA AdamW (no DeepSpeed op build)"
    )
    torch_compile: bool = Field(False, description="torch.compile the model (GPU); compile time is logged")
    cache_train_mb: int = Field(
        256, ge=0, description="keep the packed training split in the object store when it is at most this "
        "size, so later epochs don't re-run the data pipeline (0 = re-stream every epoch)"
    )


class FinetuneConfig(ScheduleConfig):
    """Supervised fine-tuning on prompt/response pairs (see jobs/finetune.py).

    Scaling and engine settings not named here (workers, ZeRO stage, precision, clipping, betas,
    checkpoints kept, failures) are taken from the `train` section, so one cluster setup serves both.
    """

    paths: list[str] = Field(
        default_factory=list, description="jsonl pairs or chat messages; empty = demo pairs"
    )
    eval_paths: list[str] = Field(
        default_factory=list, description="held-out jsonl pairs for validation loss; empty = demo held-out"
    )
    base: str | None = Field(
        None, description="HF folder or raylm run folder to start from; default = this run's pretrained model"
    )
    task: Literal["causal", "seq2seq"] = Field(
        "causal", description="decoder LM on chat turns, or encoder-decoder (T5-style) on input -> output"
    )
    seq2seq_model: dict[str, Any] = Field(
        default_factory=lambda: {"model_type": "t5", "d_model": 128, "d_ff": 256, "num_layers": 2,
                                 "num_heads": 4, "d_kv": 32},
        description="transformers config of a fresh encoder-decoder (task=seq2seq and base unset)",
    )
    method: Literal["full", "lora"] = Field("full", description="train all weights, or LoRA adapters (peft)")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names LoRA wraps (Llama attention projections by default)",
    )
    # The schedule fields come from ScheduleConfig; fine-tuning's own defaults:
    max_steps: int = Field(150, ge=1)
    lr: float = Field(5e-4, gt=0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_batches: int = Field(4, ge=1)
    max_seq_len: int = Field(256, ge=8, description="tokens per training row (source tokens for seq2seq)")
    max_target_len: int = Field(64, ge=2, description="seq2seq only: decoder tokens per row")
    packing: bool = Field(True, description="pack several examples per row (else one example, padded)")
    num_workers: int | None = Field(None, ge=1, description="Ray Train workers; default = train.num_workers")


class EvalConfig(BaseModel):
    """Held-out evaluation (see jobs/evaluate.py)."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(
        default_factory=list, description="held-out jsonl prompt/response pairs; empty = demo held-out pairs"
    )
    text_paths: list[str] = Field(
        default_factory=list,
        description="held-out text (.txt, .jsonl, .parquet) for perplexity; empty = data validation split",
    )
    max_examples: int = Field(64, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1, description="prompts decoded together")
    max_ppl_tokens: int = Field(32_768, ge=16, description="held-out tokens scored for perplexity")
    num_samples: int = Field(4, ge=0, description="sample generations shown in the report")
    min_exact_match: float | None = Field(None, ge=0, le=1, description="deploy gate; None = no gate")


class RunSections(Protocol):
    """The parts of a run configuration the job stages read.

    `cluster.config.RunConfig` satisfies it; typing the stages against this protocol keeps `jobs` from
    importing the control plane that composes the sections.
    """

    data: DataConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    train: TrainConfig
    finetune: FinetuneConfig
    eval: EvalConfig

    @property
    def run_name(self) -> str: ...

    def run_dir(self) -> str: ...

    def section_hash(self, *sections: str) -> str: ...
