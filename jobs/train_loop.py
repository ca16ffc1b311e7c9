"""The generic Ray Train + DeepSpeed worker loop, shared by pretraining and fine-tuning.

A caller describes *what* to train with a `LoopSpec` (how to build the model, the loss over a batch
dict, which dataset shards and columns to read, the `train` hyperparameters) and calls `fit()`. The
loop supplies everything else the same way for every stage: the DeepSpeed engine (ZeRO-3 with
`zero.Init`), validation, metrics, complete-only checkpoints, and exact resume of model, optimizer,
scheduler and data position after a worker failure or a `--resume`.

Data position: each worker counts the micro batches it consumed in the current epoch of its shard;
on resume it skips exactly that many from the re-created iterator. Ray Data's `streaming_split` is
called with `equal=True` and the driver asks for `preserve_order`, so every epoch yields the same
number of batches per worker and the skipped count matches what was trained.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from jobs.deepspeed_config import deepspeed_config, lr_lambda
from jobs.metrics import MetricsWriter, ProgressTail, mfu
from jobs.model import FlopsSpec, count_params

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
PROBE_FILE = "probe.safetensors"
PIDS_DIR = "pids"


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
        self.ds_config = deepspeed_config(self.cfg, self.world)
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
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, self.cfg.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg)),
        )
        # fp32 without ZeRO: DeepSpeed clips with the plain-torch path and keeps no norm, so measure it
        # here (after the gradients are averaged, before the step clears them); the other paths report it.
        self._own_grad_norm = not (
            self.cfg.zero_stage or self.engine.bfloat16_enabled() or self.engine.fp16_enabled()
        )
        if self.world == 1 and self.cfg.zero_stage == 0:
            # One worker has nothing to average: skip DeepSpeed's flatten → all-reduce → unflatten copy
            # of every gradient on every step (a few percent of a small model's step on CPU).
            self.engine.enable_backward_allreduce = False
        self.writer = MetricsWriter(spec.out_dir) if self.rank == 0 else None
        self.step, self.tokens_seen, self.epoch, self.micro_in_epoch = 0, 0, 0, 0
        self._val_batches: list[Batch] | None = None

    # -- resume --------------------------------------------------------------------------------------
    def restore(self) -> str | None:
        """Load the newest complete checkpoint of this run (fit() clears the stage folder of a fresh run)."""
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is None:
            chosen = newest_complete(self.spec.out_dir)
            skipped = skipped_reasons(self.spec.out_dir, chosen)
        else:
            with reported.as_directory() as reported_dir:
                chosen = newest_complete(self.spec.out_dir, also=reported_dir)
                skipped = skipped_reasons(self.spec.out_dir, chosen)
        if chosen is None and not skipped:
            return None  # a fresh run
        for path, reason in skipped:
            log.warning("skipping incomplete checkpoint %s: %s", path, reason)
            if self.writer:
                self.writer.log("checkpoint_skipped", self.step, path=path, reason=reason)
        if chosen is None:
            log.warning("no complete checkpoint under %s; starting from step 0", self.spec.out_dir)
            return None
        meta = read_meta(chosen)
        if self.spec.config_hash and meta.get("config_hash") not in (None, self.spec.config_hash):
            log.warning("checkpoint %s was written with a different model/data config", chosen)
        if meta["world_size"] != self.world and self.cfg.zero_stage > 0:
            raise RuntimeError(
                f"checkpoint {chosen} was written by {meta['world_size']} workers; ZeRO shards need the same "
                f"train.num_workers (got {self.world})"
            )
        self.engine.load_checkpoint(str(chosen), tag=meta["tag"])
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.epoch = meta["data_position"]["epoch"]
        self.micro_in_epoch = meta["data_position"]["micro_batches_in_epoch"]
        return str(chosen)

    # -- phases ----------------------------------------------------------------------------------------
    def _batches(self, name: str, drop_last: bool):
        import ray.train

        it = ray.train.get_dataset_shard(name).iter_torch_batches(
            batch_size=self.cfg.micro_batch_size, dtypes=torch.long, drop_last=drop_last, device=self.device
        )
        for batch in it:
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
        cfg, spec = self.cfg, self.spec
        node_ids, pids = self.node_info()
        if self.writer:
            self.writer.log(
                "start",
                self.step,
                resumed_from=resumed_from,
                world_size=self.world,
                node_ids=node_ids,
                pids=pids,
                num_params=self.flops.num_params,
                flops_per_token=self.flops.flops_per_token(),
                data_position={"epoch": self.epoch, "micro_batches_in_epoch": self.micro_in_epoch},
            )
        peak_total = cfg.peak_flops * self.world
        interval_tokens, interval_loss, interval_micro = 0, 0.0, 0
        interval_start, train_time = time.perf_counter(), 0.0
        last_metrics: dict[str, Any] = {}
        own_norm = float("nan")
        while self.step < cfg.max_steps:
            skip, seen_in_epoch = self.micro_in_epoch, 0
            for batch in self._batches(spec.train_dataset, drop_last=True):
                seen_in_epoch += 1
                if seen_in_epoch <= skip:
                    continue
                loss = spec.loss_fn(self.engine, batch)
                self.engine.backward(loss)
                if self._own_grad_norm and self.engine.is_gradient_accumulation_boundary():
                    own_norm = float(
                        torch.nn.utils.get_total_norm(
                            [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                        )
                    )
                self.engine.step()
                self.micro_in_epoch += 1
                interval_tokens += spec.count_tokens(batch)
                interval_loss += float(loss.detach())
                interval_micro += 1
                if self.engine.global_steps == self.step:
                    continue  # still accumulating gradients
                self.step = self.engine.global_steps
                final = self.step >= cfg.max_steps
                logging_step = self.step % cfg.log_every == 0 or final
                checkpoint_step = self.step % cfg.checkpoint_every == 0 or final
                if logging_step or checkpoint_step:
                    elapsed = time.perf_counter() - interval_start
                    train_time += elapsed
                    global_tokens = round(self._mean(interval_tokens) * self.world)
                    self.tokens_seen += global_tokens
                    rate = global_tokens / max(elapsed, 1e-9)
                    grad_norm = own_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
                    last_metrics = {
                        "loss": self._mean(interval_loss / interval_micro),
                        "lr": self.engine.get_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "tokens_per_s": rate,
                        "mfu": mfu(rate, self.flops.flops_per_token(), peak_total),
                        "tokens_seen": self.tokens_seen,
                        "epoch": self.epoch,
                        "train_time_s": train_time,
                    }
                    if self.writer:
                        self.writer.log("train", self.step, **last_metrics)
                    interval_tokens, interval_loss, interval_micro = 0, 0.0, 0
                if self.step % cfg.eval_every == 0 or final:
                    val = self.evaluate()
                    if val:
                        last_metrics.update(val)
                        if self.writer:
                            self.writer.log("val", self.step, **val)
                if checkpoint_step:
                    self.save({"step": self.step, **last_metrics}, final=final)
                if logging_step or checkpoint_step:
                    interval_start = time.perf_counter()  # eval and checkpoint time is not training time
                if final:
                    break
            else:
                if seen_in_epoch <= skip:
                    raise RuntimeError(
                        f"dataset shard '{spec.train_dataset}' yielded {seen_in_epoch} batches of "
                        f"{cfg.micro_batch_size}; need more data per worker or a smaller "
                        "train.micro_batch_size"
                    )
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
        if self.writer:
            self.writer.log("end", self.step, tokens_seen=self.tokens_seen)
            self.writer.close()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on every worker: build, restore, train."""
    logging.basicConfig(level=logging.INFO)
    worker = _Worker(config["spec"])
    resumed_from = worker.restore()
    worker.train(resumed_from)


# ---------------------------------------------------------------------------------------------- driver


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
