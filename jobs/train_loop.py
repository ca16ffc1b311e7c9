"""The generic Ray Train + DeepSpeed worker loop, shared by pretraining and fine-tuning.

A caller describes *what* to train with a `LoopSpec` (how to build the model, the loss over a batch
dict, which dataset shards and columns to read, the `train` hyperparameters) and calls `fit()`. The
loop supplies everything else the same way for every stage: the DeepSpeed engine (ZeRO-3 with
`zero.Init`), validation, metrics, complete-only checkpoints, and exact resume of model, optimizer,
scheduler and data position after a worker failure or a `--resume`.

Data order and position (what makes a resume exact):

1. The driver re-cuts the training split into blocks of exactly `ROWS_PER_BLOCK` rows. Ray Train hands
   blocks to workers with `streaming_split(equal=True)`, which (under `preserve_order`) gives each block
   to the worker with the fewest rows so far; with uniform blocks a worker's row sequence depends on
   the row sequence alone, not on how many files, read tasks or CPUs produced it.
2. Materialised data (`LoopSpec.shuffle_blocks`) also gets a seeded permutation of those blocks.
3. Each worker shuffles its rows through Ray Data's local shuffle buffer, seeded by (seed, epoch, rank):
   a new order every epoch, the same order for the same epoch on every (re)start.
4. Each worker counts the micro batches it consumed in the current epoch; on resume it re-creates that
   epoch's iterator and skips exactly that many. Every epoch yields the same number of batches per
   worker (`equal=True`, `drop_last`), so the skipped count matches what was trained.

A checkpoint written by a different number of ZeRO workers is converted once to DeepSpeed's universal
format and loaded with `load_universal` (elastic resume); the data position then maps by samples
consumed, which keeps the epoch's progress but not the exact batches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.checkpointing import (
    HF_SUBDIR,
    checkpoint_dirs,
    list_files,
    newest_complete,
    read_meta,
    skipped_reasons,
    write_meta,
)
from jobs.config import TrainConfig
from jobs.deepspeed_config import deepspeed_config, loop_clips_gradients, lr_lambda, zero3_leaf_classes
from jobs.metrics import MetricsWriter, ProgressTail, log_launch, mfu, peak_flops
from jobs.model import FlopsSpec, count_params

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
PROBE_FILE = "probe.safetensors"
PIDS_DIR = "pids"
UNIVERSAL_DIR = "universal"  # DeepSpeed universal conversions of checkpoints, for a new world size
# Rows (packed blocks) per Ray block of the training split: small enough that a block permutation
# mixes a small corpus, large enough that a 10B-token corpus stays at ~10^5 Ray blocks.
ROWS_PER_BLOCK = 64


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy over every position (pretraining on packed blocks)."""
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def count_input_tokens(batch: Batch) -> int:
    return int(batch["input_ids"].numel())


@dataclass
class LoopSpec:
    """Everything a stage decides; shipped to every worker (must pickle: use module-level callables)."""

    stage: str  # folder under the run dir and the Ray run name: "pretrain", "finetune", ...
    run_dir: str  # absolute path of the run folder
    train: TrainConfig
    build_model: Callable[[], torch.nn.Module]  # called on every worker, inside zero.Init for stage 3
    seq_len: int
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] = causal_lm_loss
    count_tokens: Callable[[Batch], int] = count_input_tokens
    columns: tuple[str, ...] = ("input_ids",)
    train_dataset: str = "train"
    val_dataset: str | None = "val"
    tokenizer_dir: str | None = None  # copied into every checkpoint so it exports on its own
    config_hash: str = ""
    probe_len: int = 16  # final checkpoint stores logits of a fixed input, to verify export round-trips
    shuffle: bool = True  # seeded per-epoch shuffle of the training split (see the module docstring)
    shuffle_blocks: bool = False  # also permute the blocks once: only for materialised data (a barrier)
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # Ray Train's storage when checkpoints live at a URI (s3://...); run_dir then holds only the local
    # artefacts (metrics, exports) and the checkpoints are fetched from here for export.
    storage_path: str | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / self.stage


# ---------------------------------------------------------------------------------------------- worker


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm gains (1-D tensors), as in GPT-style recipes."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
            (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _probe_ids(vocab_size: int, length: int) -> torch.Tensor:
    return (torch.arange(length, dtype=torch.long).unsqueeze(0) * 7 + 3) % vocab_size


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local-shuffle seed of one worker in one epoch: a pure function, so a restart repeats it."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def shard_batches(
    shard: Any,
    batch_size: int,
    drop_last: bool,
    seed: int | None = None,
    buffer_rows: int = 0,
    device: torch.device | None = None,
):
    """Torch batches of one worker's dataset shard, shuffled when `seed` is given.

    The shuffle is Ray Data's local shuffle buffer (`iter_torch_batches(local_shuffle_buffer_size,
    local_shuffle_seed)`): a seeded permutation of a sliding window of `buffer_rows` rows of this
    worker's stream. It works the same on streamed and materialised data and needs no barrier; for
    the same input and seed it yields the same batches, which is what skipping the consumed count
    on resume relies on.
    """
    shuffle: dict[str, Any] = {}
    if seed is not None:
        shuffle = {"local_shuffle_buffer_size": buffer_rows, "local_shuffle_seed": seed}
    return shard.iter_torch_batches(
        batch_size=batch_size, dtypes=torch.long, drop_last=drop_last, device=device or "cpu", **shuffle
    )


def _unshare_step_counts(optimizer: Any) -> None:
    """Give every parameter group its own Adam step counter after a universal load.

    DeepSpeed 0.19's ZeRO-3 universal load stores one `step` tensor object in the state of every
    parameter group; torch's AdamW increments it in place once per group, so with our two groups (decay,
    no decay) the count would advance twice per step and skew Adam's bias correction (found by
    tests/train/test_elastic_resume.py: 6 restored + 6 new steps read 18).
    """
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def to_universal(checkpoint: Path, tag: str, out_root: Path) -> float:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format under `out_root/tag`; returns seconds.

    Reuses a finished conversion (marked by COMPLETE); a half-written one is removed and redone.
    One process (no worker pools): the conversion runs inside a Ray worker.
    """
    from deepspeed.checkpoint import ds_to_universal

    if (out_root / "COMPLETE").is_file():
        return 0.0
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    start = time.perf_counter()
    ds_to_universal.main(
        argparse.Namespace(
            input_folder=str(checkpoint / tag),
            output_folder=str(out_root / tag),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
    )
    (out_root / "COMPLETE").write_text("ok\n")
    return time.perf_counter() - start


@dataclass
class _Resume:
    """The checkpoint a worker resumes from, and how it loads it."""

    path: Path | None
    skipped: list[tuple[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)
    universal: bool = False  # written by another world size: load the universal conversion
    load_dir: Path | None = None
    convert_s: float = 0.0


class _Interval:
    """Loss and token sums since the last log, kept on the device so a micro step never syncs the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens, self.micro = 0, 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum += loss
        self.tokens += tokens
        self.micro += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reduce(self, dist: Any, world: int) -> tuple[float, float]:
        """(mean micro-batch loss over all ranks, total tokens of all ranks): one all-reduce, one sync."""
        t = torch.stack([self.loss_sum / max(self.micro, 1), self.loss_sum.new_tensor(float(self.tokens))])
        dist.all_reduce(t)
        loss_mean, tokens = t.tolist()
        return loss_mean / world, tokens


class _Worker:
    """State of one training worker; methods are the phases of `train_loop_per_worker`."""

    def __init__(self, spec: LoopSpec):
        import deepspeed
        import ray.train
        import torch.distributed as dist

        self.spec, self.cfg = spec, spec.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world = ctx.get_local_world_size()
        self.dist = dist
        threads = self.cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, self.local_world))
        torch.set_num_threads(threads)
        self.device = torch.device("cuda", ctx.get_local_rank()) if self.cfg.use_gpu else torch.device("cpu")
        if self.cfg.use_gpu:
            torch.cuda.set_device(self.device)
        spec.out_dir.joinpath(PIDS_DIR).mkdir(parents=True, exist_ok=True)
        spec.out_dir.joinpath(PIDS_DIR, f"rank{self.rank}.pid").write_text(str(os.getpid()))

        # Ray already created the process group; DeepSpeed's comm layer must adopt it before zero.Init.
        deepspeed.init_distributed(dist_backend="nccl" if self.cfg.use_gpu else "gloo")
        torch.manual_seed(self.cfg.seed)
        self.resume = self._choose_checkpoint()
        self.ds_config = deepspeed_config(self.cfg, self.world, load_universal=self.resume.universal)
        if self.cfg.zero_stage == 3:
            # zero.Init patches torch.Tensor.__new__; torch._dynamo, which transformers imports lazily,
            # refuses to load under that patch, so it must already be imported.
            importlib.import_module("torch._dynamo")
            from transformers.integrations import HfDeepSpeedConfig

            # Makes transformers build under zero.Init itself, gathering partitions for weight init
            # (a bare zero.Init around from_config breaks HF's padding-row init). Must stay referenced.
            self._hf_deepspeed = HfDeepSpeedConfig(self.ds_config)
        model = spec.build_model()
        if self.cfg.activation_checkpointing:
            model.gradient_checkpointing_enable()
        self.hf_config = getattr(model, "config", None)
        self.flops = FlopsSpec.of(self.hf_config, count_params(model), spec.seq_len)
        self.zero3_leaves = zero3_leaf_classes(self.cfg, model)
        if self.zero3_leaves:  # before initialize: ZeRO-3 places its hooks by these flags
            deepspeed.utils.set_z3_leaf_modules(model, self.zero3_leaves)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, self.cfg.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg)),
        )
        # ZeRO-3 parameters kept whole on every worker (train.zero3_param_persistence_threshold): in the
        # start record, so a run shows whether its forward/backward all-gathers anything.
        persistent = getattr(self.engine.optimizer, "persistent_parameters", None) or []
        self.whole_params = sum(p.ds_numel for p in persistent) if self.cfg.zero_stage == 3 else None
        # fp32 without ZeRO: the loop clips (see `loop_clips_gradients`) and so has the norm; the other
        # paths clip inside DeepSpeed, which reports the norm.
        self._own_grad_norm = loop_clips_gradients(self.cfg)
        if self.world == 1 and self.cfg.zero_stage == 0:
            # One worker has nothing to average: skip DeepSpeed's flatten → all-reduce → unflatten copy
            # of every gradient on every step (a few percent of a small model's step on CPU).
            self.engine.enable_backward_allreduce = False
        self._compile_pending = False
        if getattr(self.cfg, "torch_compile", False):
            self.engine.compile()  # compiles lazily: the first micro step's time is logged as "compile"
            self._compile_pending = True
        device_name = torch.cuda.get_device_name(self.device) if self.cfg.use_gpu else None
        self.peak_flops = peak_flops(device_name, self.cfg.peak_flops)
        self.writer = MetricsWriter.for_rank(spec.out_dir, self.rank)
        self.step, self.tokens_seen, self.epoch, self.micro_in_epoch = 0, 0, 0, 0
        self.train_time = 0.0
        self._own_norm: torch.Tensor | float = float("nan")
        self._last_metrics: dict[str, Any] = {}
        self._val_batches: list[Batch] | None = None

    # -- resume --------------------------------------------------------------------------------------
    def _choose_checkpoint(self) -> _Resume:
        """The newest complete checkpoint of this run (fit() clears the stage folder of a fresh run).

        Called before the engine exists: a checkpoint from another world size needs the engine built
        with `load_universal`, after rank 0 has converted it (the other ranks wait at a barrier).
        """
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is None:
            chosen = newest_complete(self.spec.out_dir)
        else:
            with reported.as_directory() as reported_dir:
                chosen = newest_complete(self.spec.out_dir, also=reported_dir)
        resume = _Resume(chosen, skipped_reasons(self.spec.out_dir, chosen))
        if chosen is None:
            return resume
        resume.meta = read_meta(chosen)
        old_world = resume.meta["world_size"]
        if old_world == self.world or resume.meta["zero_stage"] == 0:
            return resume  # same shards, or ZeRO-0 (nothing partitioned): a plain load
        resume.universal = True
        resume.load_dir = self.spec.out_dir / UNIVERSAL_DIR / chosen.name
        if self.rank == 0:
            log.warning(
                "checkpoint %s was written by %d workers, this run has %d: converting it to DeepSpeed's "
                "universal checkpoint format (once) and loading that; the data position maps by samples",
                chosen, old_world, self.world,
            )
            resume.convert_s = to_universal(chosen, resume.meta["tag"], resume.load_dir)
        self.dist.barrier()
        return resume

    def restore(self) -> str | None:
        """Load the chosen checkpoint: model, optimizer, scheduler, step, tokens and data position."""
        resume = self.resume
        if resume.path is None and not resume.skipped:
            return None  # a fresh run
        for path, reason in resume.skipped:
            log.warning("skipping incomplete checkpoint %s: %s", path, reason)
            self.writer.log("checkpoint_skipped", self.step, path=path, reason=reason)
        if resume.path is None:
            log.warning("no complete checkpoint under %s; starting from step 0", self.spec.out_dir)
            return None
        meta = resume.meta
        if self.spec.config_hash and meta.get("config_hash") not in (None, self.spec.config_hash):
            log.warning("checkpoint %s was written with a different model/data config", resume.path)
        self.engine.load_checkpoint(str(resume.load_dir or resume.path), tag=meta["tag"])
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.epoch = meta["data_position"]["epoch"]
        self.micro_in_epoch = meta["data_position"]["micro_batches_in_epoch"]
        if resume.universal:
            _unshare_step_counts(self.engine.optimizer)
            # Same samples of the epoch consumed; which ones each new worker skips differs (new split).
            self.micro_in_epoch = self.micro_in_epoch * meta["world_size"] // self.world
            self.writer.log(
                "elastic_resume", self.step, from_world_size=meta["world_size"],
                to_world_size=self.world, universal_dir=str(resume.load_dir),
                conversion_s=resume.convert_s,
            )
        return str(resume.path)

    # -- phases ----------------------------------------------------------------------------------------
    def _batches(self, name: str, drop_last: bool, epoch: int | None = None):
        """Micro batches of a dataset shard; given `epoch` (training), in that epoch's shuffled order."""
        import ray.train

        seed = None
        if epoch is not None and self.spec.shuffle:
            seed = shuffle_seed(self.cfg.seed, epoch, self.rank)
        batches = shard_batches(
            ray.train.get_dataset_shard(name),
            self.cfg.micro_batch_size,
            drop_last,
            seed=seed,
            buffer_rows=self.cfg.shuffle_buffer_blocks,
            device=self.device,
        )
        for batch in batches:
            yield {k: batch[k] for k in self.spec.columns}

    def _mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return float(t.item()) / self.world

    def evaluate(self) -> dict[str, float] | None:
        """Mean loss over the first `eval_batches` validation batches (every rank sees the same ones)."""
        if not self.spec.val_dataset:
            return None
        if self._val_batches is None:
            # Read once and keep: a streamed validation set would re-run the whole data pipeline per eval,
            # and a fixed set makes successive validation losses comparable.
            self._val_batches = []
            for batch in self._batches(self.spec.val_dataset, drop_last=False):
                if len(self._val_batches) >= self.cfg.eval_batches:
                    break
                self._val_batches.append(batch)
        self.engine.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in self._val_batches:
                total += float(self.spec.loss_fn(self.engine, batch))
                n += 1
        self.engine.train()
        if n == 0:
            return None
        loss = self._mean(total / n)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def save(self, metrics: dict[str, Any], final: bool) -> None:
        """Every rank saves its shard; rank 0 adds HF config, tokenizer, metadata and the marker; report."""
        import ray.train
        from ray.train import Checkpoint

        tag = f"global_step{self.step}"
        position = {"epoch": self.epoch, "micro_batches_in_epoch": self.micro_in_epoch}
        with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=tag, client_state={"data_position": position})
            probe = self._probe() if final else None
            files = [None] * self.world
            self.dist.all_gather_object(files, list_files(tmp))
            if self.rank == 0:
                if self.hf_config is not None:
                    self.hf_config.save_pretrained(Path(tmp) / HF_SUBDIR)
                if self.spec.tokenizer_dir:
                    for f in Path(self.spec.tokenizer_dir).iterdir():
                        if f.is_file():
                            shutil.copy2(f, Path(tmp) / HF_SUBDIR / f.name)
                if probe is not None:
                    from safetensors.torch import save_file

                    save_file(probe, str(Path(tmp) / PROBE_FILE))
                merged: dict[str, int] = {}
                for rank_files in files:
                    merged.update(rank_files)
                merged.update(list_files(tmp))
                meta = {
                    "stage": self.spec.stage,
                    "tag": tag,
                    "step": self.step,
                    "tokens_seen": self.tokens_seen,
                    "data_position": position,
                    "world_size": self.world,
                    "zero_stage": self.cfg.zero_stage,
                    "config_hash": self.spec.config_hash,
                    "final": final,
                    **self.spec.extra_meta,
                }
                write_meta(tmp, meta, merged)
                self.writer.log("checkpoint", self.step, tag=tag, final=final)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def _probe(self) -> dict[str, torch.Tensor] | None:
        """Logits of the trained model on a fixed input (all ranks run it: ZeRO-3 gathers in lockstep)."""
        vocab = getattr(self.hf_config, "vocab_size", None)
        if vocab is None or getattr(self.hf_config, "is_encoder_decoder", False):
            return None
        ids = _probe_ids(vocab, min(self.spec.probe_len, self.spec.seq_len)).to(self.device)
        self.engine.eval()
        with torch.no_grad():
            logits = self.engine(input_ids=ids).logits.float().cpu()
        self.engine.train()
        return {"input_ids": ids.cpu(), "logits": logits.contiguous()}

    def node_info(self) -> tuple[list[str], list[int]]:
        import ray

        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, (ray.get_runtime_context().get_node_id(), os.getpid()))
        return [g[0] for g in gathered], [g[1] for g in gathered]

    def train(self, resumed_from: str | None) -> None:
        """The loop, nanoGPT-style: micro step → (at an optimizer-step boundary) log, eval, checkpoint."""
        cfg = self.cfg
        self._log_start(resumed_from)
        interval = _Interval(self.device)
        for batch in self._resumable_batches():
            interval.add(self._micro_step(batch), self.spec.count_tokens(batch))
            if self.engine.global_steps == self.step:
                continue  # still accumulating gradients
            self.step = self.engine.global_steps
            final = self.step >= cfg.max_steps
            log_step = self.step % cfg.log_every == 0 or final
            checkpoint_step = self.step % cfg.checkpoint_every == 0 or final
            if log_step or checkpoint_step:
                self._last_metrics = self._log_interval(interval)
            if self.step % cfg.eval_every == 0 or final:
                self._last_metrics.update(self._eval_and_log())
            if checkpoint_step:
                self.save({"step": self.step, **self._last_metrics}, final=final)
            if log_step or checkpoint_step:
                interval.restart()  # eval and checkpoint time is not training time
            if final:
                break
        self.writer.log("end", self.step, tokens_seen=self.tokens_seen)
        self.writer.close()

    # -- the loop's named steps ------------------------------------------------------------------------
    def _log_start(self, resumed_from: str | None) -> None:
        node_ids, pids = self.node_info()
        self.writer.log(
            "start",
            self.step,
            resumed_from=resumed_from,
            world_size=self.world,
            node_ids=node_ids,
            pids=pids,
            num_params=self.flops.num_params,
            whole_params=self.whole_params,
            flops_per_token=self.flops.flops_per_token(),
            peak_flops=self.peak_flops,
            zero3_leaf_modules=self.zero3_leaves,
            data_position={"epoch": self.epoch, "micro_batches_in_epoch": self.micro_in_epoch},
        )

    def _resumable_batches(self):
        """Training micro batches from the saved data position on, epoch after epoch.

        Skips the `micro_in_epoch` batches a checkpoint says were consumed in its epoch, then counts
        each batch it hands out (before the caller trains on it, so a checkpoint taken right after
        includes it) and moves to the next epoch when one is exhausted.
        """
        while self.step < self.cfg.max_steps:
            skip, seen = self.micro_in_epoch, 0
            for batch in self._batches(self.spec.train_dataset, drop_last=True, epoch=self.epoch):
                seen += 1
                if seen <= skip:
                    continue
                self.micro_in_epoch += 1
                yield batch
            if seen <= skip:
                raise RuntimeError(
                    f"dataset shard '{self.spec.train_dataset}' yielded {seen} batches of "
                    f"{self.cfg.micro_batch_size}; need more data per worker or a smaller "
                    "train.micro_batch_size"
                )
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0

    def _micro_step(self, batch: Batch) -> torch.Tensor:
        """Forward, backward and (at an accumulation boundary) the optimizer step; returns the loss.

        The loss stays on the device: reading it (`.item()`) here would sync the host every micro step.
        """
        first = self._compile_pending
        start = time.perf_counter() if first else 0.0
        loss = self.spec.loss_fn(self.engine, batch)
        self.engine.backward(loss)
        if self._own_grad_norm and self.engine.is_gradient_accumulation_boundary():
            self._own_norm = self._clip_gradients()
        self.engine.step()
        if first:
            self._compile_pending = False
            self.writer.log("compile", self.step, seconds=time.perf_counter() - start)
        return loss.detach()

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the averaged gradients to `train.grad_clip` (fp32 ZeRO-0); returns their norm, on device.

        What DeepSpeed would do in `engine.step()` (scale by min(1, clip / (norm + 1e-6))), with torch's
        foreach kernels instead of DeepSpeed's per-parameter loop and its all-reduce of a norm that is
        already the same on every rank (the gradients were averaged in `backward`).
        """
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(grads, self.cfg.grad_clip, norm)
        return norm

    def _log_interval(self, interval: _Interval) -> dict[str, Any]:
        """Metrics of the steps since the last log: one all-reduce of (loss, tokens) and one host sync."""
        elapsed = interval.elapsed()
        self.train_time += elapsed
        loss_mean, tokens_sum = interval.reduce(self.dist, self.world)
        global_tokens = round(tokens_sum)
        self.tokens_seen += global_tokens
        rate = global_tokens / max(elapsed, 1e-9)
        grad_norm = self._own_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        metrics = {
            "loss": loss_mean,
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": rate,
            "mfu": mfu(rate, self.flops.flops_per_token(), self.peak_flops * self.world),
            "tokens_seen": self.tokens_seen,
            "epoch": self.epoch,
            "train_time_s": self.train_time,
        }
        self.writer.log("train", self.step, **metrics)
        return metrics

    def _eval_and_log(self) -> dict[str, float]:
        val = self.evaluate()
        if val:
            self.writer.log("val", self.step, **val)
        return val or {}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on every worker: build, restore, train."""
    logging.basicConfig(level=logging.INFO)
    worker = _Worker(config["spec"])
    resumed_from = worker.restore()
    worker.train(resumed_from)


# ---------------------------------------------------------------------------------------------- driver


def training_order(ds: Any, spec: LoopSpec) -> Any:
    """The training split as workers must receive it: uniform blocks, permuted if materialised.

    `repartition(target_num_rows_per_block=..., strict=True)` is a streaming operator that re-cuts any
    upstream block layout into blocks of exactly ROWS_PER_BLOCK rows (the last may be shorter), so the
    per-worker split no longer depends on how many files, read ranges or CPUs produced the rows.
    `randomize_block_order(seed)` is Ray Data's block-level shuffle: cheap (it moves references, not
    rows) but an all-to-all barrier that holds every block, so only data that is already materialised
    (`spec.shuffle_blocks`) gets it; its fixed seed gives the same permutation on every execution,
    which the per-epoch local shuffle in the workers then varies.
    """
    ds = ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK, strict=True)
    if spec.shuffle and spec.shuffle_blocks:
        ds = ds.randomize_block_order(seed=spec.train.seed)
    return ds


def cache_if_small(ds: Any, max_bytes: int) -> Any:
    """`ds` executed once into the object store when it holds at most `max_bytes`, else `ds` itself.

    Ray Train re-executes a lazy dataset every epoch: for a streamed corpus that is the whole read →
    tokenise → pack pipeline again, a stall at every epoch boundary. A small packed split is executed
    once here instead (the same blocks in the same order: `preserve_order`, so the per-worker row
    sequence and with it exact resume are unchanged) and every epoch reads it from the object store.
    The execution stops as soon as the budget is exceeded; the split is then streamed each epoch, so
    a large corpus costs at most `max_bytes` of wasted pipeline work (0 skips the attempt).
    """
    if max_bytes <= 0:
        return ds
    import ray.data
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.input_data_operator import InputData
    from ray.data.dataset import MaterializedDataset

    ctx = ray.data.DataContext.get_current()
    saved, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        bundles, size = [], 0
        for bundle in ds.iter_internal_ref_bundles():
            size += bundle.size_bytes()
            if size > max_bytes:
                log.info("training split exceeds train.cache_train_mb: streaming it every epoch")
                return ds
            # Shared, not owned: the executor of an epoch must not free blocks the next epoch reads.
            bundles.append(replace(bundle, owns_blocks=False))
    finally:
        ctx.execution_options.preserve_order = saved
    # What Dataset.materialize() builds, from the bundles kept above.
    return MaterializedDataset(LogicalPlan(InputData(input_data=bundles), ctx), ds.context, ds._raw_stats())


class RunExistsError(RuntimeError):
    """A fresh run was asked for where checkpoints of an earlier run already exist."""


def check_fresh(out_dir: Path, resume: bool) -> None:
    """Refuse a fresh run over an earlier run's checkpoints (call early: before any data work)."""
    existing = checkpoint_dirs(out_dir) if out_dir.exists() else []
    if not resume and existing:
        raise RunExistsError(
            f"{out_dir} already holds {len(existing)} checkpoint(s); pass --resume to continue that run, "
            "or choose another cluster.run_name"
        )


def fit(spec: LoopSpec, datasets: dict[str, Any], resume: bool = False, progress: bool = True):
    """Run the workers under a TorchTrainer and return Ray's `Result`.

    Without `resume`, a stage folder that already holds checkpoints is refused (nothing is silently
    overwritten); leftovers of a run that never checkpointed are cleared. With `resume`, `fit()`
    reuses the same Ray run name and storage, so Ray hands the newest checkpoint to the workers.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = spec.train
    out_dir = spec.out_dir
    check_fresh(out_dir, resume)
    if not resume and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_launch(out_dir)
    ordered = training_order(datasets[spec.train_dataset], spec)
    datasets = {**datasets, spec.train_dataset: cache_if_small(ordered, cfg.cache_train_mb << 20)}
    if spec.val_dataset in datasets:
        # Workers evaluate on the first `eval_batches` batches only: read just those rows, once, here,
        # instead of every worker running the validation pipeline itself.
        head = datasets[spec.val_dataset].limit(cfg.eval_batches * cfg.micro_batch_size)
        datasets[spec.val_dataset] = cache_if_small(head, cfg.cache_train_mb << 20)
    # Same block order on every (re)start, so skipping the consumed batch count resumes exactly.
    # (Built directly: DataConfig.default_ingest_options() passes the deprecated exclude_resources.)
    ingest = ExecutionOptions(preserve_order=True)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[spec.train_dataset], execution_options=ingest),
        run_config=RunConfig(
            name=spec.stage,
            storage_path=spec.storage_path or str(Path(spec.run_dir).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    tail = ProgressTail(out_dir, cfg.max_steps, description=spec.stage) if progress else None
    if tail:
        tail.start()
    try:
        return trainer.fit()
    finally:
        if tail:
            tail.stop()


def _fetch_checkpoints(uri: str, out_dir: Path) -> None:
    """Copy the stage's checkpoint folders from object storage into `out_dir` (export reads files)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    here = pafs.LocalFileSystem()
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        local = out_dir / info.base_name
        is_checkpoint = info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
        if is_checkpoint and not local.exists():
            pafs.copy_files(info.path, str(local), source_filesystem=fs, destination_filesystem=here)


def final_checkpoint(spec: LoopSpec) -> Path:
    """Newest complete checkpoint of a finished stage (what export and the next stage start from)."""
    if spec.storage_path:
        _fetch_checkpoints(f"{spec.storage_path.rstrip('/')}/{spec.stage}", spec.out_dir)
    found = newest_complete(spec.out_dir)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {spec.out_dir}")
    return found
