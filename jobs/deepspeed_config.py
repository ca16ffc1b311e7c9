"""The one place that turns the typed `train` section into a DeepSpeed config and an LR schedule.

Pretraining and fine-tuning both go through here, so precision, ZeRO stage, offload, batch
arithmetic and the optimizer choice can be reasoned about (and tested) in one spot.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from jobs.config import TrainConfig

if TYPE_CHECKING:
    import torch


def resolve_precision(cfg: TrainConfig) -> str:
    """`auto` means bf16 on GPU (fast, no loss scaling) and fp32 on CPU (where bf16 matmuls are slow)."""
    if cfg.precision == "auto":
        return "bf16" if cfg.use_gpu else "fp32"
    return cfg.precision


def loop_clips_gradients(cfg: TrainConfig) -> bool:
    """fp32 without ZeRO: the train loop clips (one foreach norm, which it also logs), not DeepSpeed.

    DeepSpeed's fp32 ZeRO-0 clipping loops over parameters in Python and all-reduces the norm every
    step, and keeps no norm to report; the ZeRO and bf16/fp16 optimizers clip inside their own step.
    """
    return cfg.zero_stage == 0 and resolve_precision(cfg) == "fp32"


def optimizer_impl_params(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed optimizer params that pick the AdamW kernel (`train.optimizer_impl`).

    auto: DeepSpeed's multi-tensor FusedAdam on GPU (its CPUAdam when the optimizer is offloaded) and
    torch.optim.AdamW on CPU, where DeepSpeed's ops would need a C++ build. `torch_fused` is torch's
    own fused CUDA AdamW through DeepSpeed's `torch_adam` path: fused without building a DeepSpeed op.
    """
    offloading = cfg.offload_optimizer or cfg.offload_params
    impl = cfg.optimizer_impl
    if impl == "auto":
        impl = "deepspeed_fused" if cfg.use_gpu or offloading else "torch"
    if impl == "torch_fused" and not cfg.use_gpu:
        raise ValueError(
            "train.optimizer_impl torch_fused needs train.use_gpu true (allowed on CPU: auto, torch)"
        )
    if impl == "deepspeed_fused" and not (cfg.use_gpu or offloading):
        raise ValueError(
            "train.optimizer_impl deepspeed_fused needs train.use_gpu true or an offloaded optimizer "
            "(allowed on CPU: auto, torch)"
        )
    if impl == "torch_fused" and offloading:
        raise ValueError("train.optimizer_impl torch_fused cannot step an offloaded optimizer (use auto)")
    if impl == "torch":
        return {"torch_adam": True}
    if impl == "torch_fused":
        return {"torch_adam": True, "fused": True}
    return {}


# ZeRO-3 on CPU keeps parameters whole on every worker up to this many elements, each and in total
# (200 MB in fp32): a small model whole, a large one partitioned as ZeRO-3 is meant to.
CPU_WHOLE_PARAM_ELEMENTS = 50_000_000


def zero3_persistence(cfg: TrainConfig) -> dict[str, int]:
    """The ZeRO-3 persistence settings to set ({}: DeepSpeed's defaults, 1e5 elements per parameter).

    ZeRO-3's per-step host work, not its all-gathers, is what separates it from plain PyTorch on CPU:
    every partitioned parameter is fetched when its module's forward and backward begin, released after,
    and traced for prefetching, ~60 passes through that bookkeeping a step for the 12.5M benchmark Llama
    (with DeepSpeed's threshold only norms are whole: a 320 x 320 projection already has 102,400
    elements). `auto` on CPU (gloo, parameters not offloaded) keeps every parameter up to
    `CPU_WHOLE_PARAM_ELEMENTS` whole, and at most that many in all
    (`stage3_model_persistence_threshold`, so a large model's memory is still partitioned; preflight
    counts the whole ones): the hooks find nothing to fetch, gradients and optimizer state stay
    partitioned (one reduce-scatter per step, one gather of the updated parameters after the optimizer,
    as ZeRO-2), and checkpoints keep the same sharded layout. On GPU, NCCL gathers overlap compute
    through prefetching and memory is the point of ZeRO-3, so DeepSpeed's default stays.

    Measured outside Ray (`python benchmarks/zero3_settings.py`: 12.5M Llama, 2 gloo processes x 1
    thread, micro batch 4; rank 0's CPU seconds per step after warm-up, median of 3 alternating
    rounds; identical losses in every setting) on 2 cores shared with other jobs, so indicative:

        setting (zero_optimization)                       run A  run B  run C   vs defaults
        DeepSpeed's defaults (persistence threshold 1e5)  1.083  1.042  1.026   -
        stage3_param_persistence_threshold 5e7 (auto)     1.011  0.986  0.985   +4 to +7 % (9/9 pairs)
        LlamaDecoderLayer as ZeRO-3 leaf modules          1.073                 +1 %
        leaf modules + threshold 5e7                      1.011                 +7 % (= threshold alone)
        leaf modules + stage3_prefetch_bucket_size 0      1.034                 +5 %
        stage3_prefetch_bucket_size 0                                   1.041   -1 %
        stage3_module_granularity_threshold 1e9           fails: zero_grad calls record_stream on a
                                                          CPU tensor (DeepSpeed 0.19.8)

    Wall seconds per step in run C (16 steps, quietest): 1.288 with the defaults, 1.231 kept whole
    (+5 %). Leaf modules (one hook per decoder layer instead of per Linear/Norm) add nothing once
    nothing is partitioned under load; alone on the machine they gave +3 % on top (see
    `zero3_leaf_classes`). Inside Ray, alone on the machine, before leaf modules
    (`benchmarks/train_throughput.py --sizes 12.5M`, 3 rounds): 2 workers ZeRO-3 1,769 / 1,722 / 1,723
    tokens/s against plain PyTorch's 2,100 / 2,110 / 2,064 just before, median 0.83x (0.81-0.82x with
    DeepSpeed's threshold). The rest of the gap is data parallelism on two cores itself: kept whole,
    a ZeRO-3 step out of Ray (about 0.99 CPU-s) is where ZeRO-1's was (1.01 s): the gradient
    reduce-scatter and the gather after the optimizer, which no spare core can overlap with compute.
    """
    if cfg.zero_stage != 3:
        return {}
    if cfg.zero3_param_persistence_threshold != "auto":
        return {"stage3_param_persistence_threshold": cfg.zero3_param_persistence_threshold}
    if cfg.use_gpu or cfg.offload_params:
        return {}
    return {
        "stage3_param_persistence_threshold": CPU_WHOLE_PARAM_ELEMENTS,
        "stage3_model_persistence_threshold": CPU_WHOLE_PARAM_ELEMENTS,
    }


def zero3_whole_elements(cfg: TrainConfig, trainable: int) -> int:
    """At most how many parameter elements ZeRO-3 keeps whole on each worker (for memory estimates):
    DeepSpeed's own default keeps only tiny tensors (norms), counted as nothing here."""
    persistence = zero3_persistence(cfg)
    cap = persistence.get("stage3_model_persistence_threshold", trainable)
    return min(trainable, cap) if persistence.get("stage3_param_persistence_threshold") else 0


def zero3_leaf_classes(cfg: TrainConfig, model: torch.nn.Module) -> list[str]:
    """Module classes ZeRO-3 treats as leaves (`train.zero3_leaf_modules`): hooked as one unit.

    ZeRO-3 hooks every submodule that holds parameters: before its forward and backward it fetches
    (all-gathers) them, after it releases them, and each step it traces the order to prefetch. For a
    Llama that is ~10 modules per decoder layer (4 attention projections, 3 MLP projections, 2 norms,
    the blocks around them), each a pass through Python bookkeeping. A leaf module is fetched and
    released as a whole and its gradients reduced by one hook after its backward, so `layers` (the
    model's own transformer block, `_no_split_modules` in transformers) leaves ~1 hooked module per
    layer. Numerics are unchanged: the same gathers of the same parameters, fewer calls.

    `auto` chooses `layers` for ZeRO-3 on CPU, where that host work is not hidden behind compute:
    measured outside Ray alone on the machine (benchmarks/zero3_settings.py, 12.5M Llama, 2 gloo
    processes x 1 thread, 2 cores, parameters kept whole by `zero3_persistence`), CPU s/step 1.044 ->
    1.005 and 1.012 -> 0.986 in two alternating rounds (+3 %), identical losses; in Ray
    (`train_throughput.py --sizes 12.5M`, alone) 2 workers ZeRO-3 went from 0.83x to 0.85x of plain
    PyTorch (median of 3; rounds 0.87 / 0.85 / 0.85x). On GPU DeepSpeed's per-module granularity stays
    (prefetching overlaps gathers with compute there; not measured here). `auto` also stays off where
    leaves are not exercised by the tests: offloaded parameters, activation checkpointing (recomputation
    inside a leaf's backward hook), encoder-decoder models and partly frozen models (LoRA).
    """
    choice = cfg.zero3_leaf_modules
    if cfg.zero_stage != 3 or choice == "none":
        return []
    frozen = any(not p.requires_grad for p in model.parameters())
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if choice == "auto" and (
        cfg.use_gpu or cfg.offload_params or cfg.activation_checkpointing or frozen or encoder_decoder
    ):
        return []
    present = {type(m).__name__ for m in model.modules()}
    blocks = [name for name in getattr(model, "_no_split_modules", None) or [] if name in present]
    if not blocks and choice == "layers":
        raise ValueError(
            f"train.zero3_leaf_modules layers: {type(model).__name__} names no transformer block class "
            "(transformers' _no_split_modules); allowed for this model: auto, none"
        )
    return blocks


def deepspeed_config(cfg: TrainConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed config dict for `world_size` workers (LR schedule is separate: see `lr_lambda`).

    `load_universal` makes `load_checkpoint` read a universal checkpoint (`ds_to_universal` output):
    how a ZeRO checkpoint written by a different number of workers is resumed.
    """
    precision = resolve_precision(cfg)
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ValueError(f"train.offload_params needs train.zero_stage 3 (got {cfg.zero_stage})")
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        raise ValueError("train.offload_optimizer needs train.zero_stage 1, 2 or 3 (got 0)")
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.zero_stage == 3:
        # Export consolidates the fp32 shards offline (zero_to_fp32), so no 16-bit gather at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero.update(zero3_persistence(cfg))
    optimizer_params: dict[str, Any] = {
        "lr": cfg.lr,
        "betas": list(cfg.betas),
        "eps": 1e-8,
        "weight_decay": cfg.weight_decay,
    }
    optimizer_params.update(optimizer_impl_params(cfg))
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": 0.0 if loop_clips_gradients(cfg) else cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def lr_lambda(cfg: TrainConfig):
    """Multiplier of `train.lr` at optimizer step s: linear warmup, then cosine down to `min_lr_ratio`."""
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
