"""Capacity and memory preflight: refuse a run the cluster can never hold, before any work starts.

Ray never fails a resource request that no node can satisfy: a placement group for 16 one-CPU train
workers on a 2-CPU machine stays pending forever, and the command shows "starting workers…" until it
is killed. So every stage that asks Ray for resources (data, train, finetune, eval, serve) first
states its demand as Ray resource bundles plus a placement strategy, and this module checks it
against the nodes that are alive:

1. Fixed-size cluster (the embedded Ray, `raylm cluster up`, a cluster without autoscaler): a demand
   that cannot be placed fails at once with `PreflightError` (exit 2): what was asked, what the
   cluster has, which setting to change.
2. Cluster with an autoscaler (found by `has_autoscaler`, or `cluster.autoscaler: true`): the demand
   is handed to the autoscaler (`request_resources`) and the command waits with a progress line
   naming what it waits for, up to `cluster.resource_wait_timeout_s`, then fails with the same message.
3. Training stages (pretrain and finetune, full or LoRA): DeepSpeed's own estimators give the
   model-state memory per worker for the ZeRO stage and offload settings, plus an activation estimate
   for the micro batch; the per-node sum is printed, written to `<run>/preflight/`, and refused when
   it exceeds the node's memory (or `cluster.node_memory_gb`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster.config import RunConfig, UserError

POLL_S = 2.0
GIB = 2**30


class PreflightError(UserError):
    """The run can never start on this cluster (or not within the wait); the message says why."""


@dataclass(frozen=True)
class Demand:
    """What one stage asks Ray for: `bundles` placed with `strategy`, plus `extra` bundles anywhere."""

    stage: str
    bundles: list[dict[str, float]]
    strategy: str
    settings: str  # the settings that size this demand, named in messages
    extra: list[dict[str, float]] = field(default_factory=list)
    extra_why: str = ""

    def describe(self) -> str:
        counts = f"{len(self.bundles)} x {_fmt(self.bundles[0])}" if self.bundles else "nothing"
        more = f" + {len(self.extra)} x {_fmt(self.extra[0])} {self.extra_why}" if self.extra else ""
        return f"{self.stage}: {counts} ({self.strategy}){more}"


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items()) if v) + "}"


def demand_name(stage: str) -> str:
    """The pipeline's stage vocabulary (`data_pipelines.layout.Stage`, aliases resolved), plus `serve`:
    the names this module's messages and files use, whatever name the command was given."""
    from data_pipelines.layout import STAGE_ALIASES

    return str(STAGE_ALIASES.get(str(stage), stage))


def stage_demand(cfg: RunConfig, stage: str) -> Demand:
    """The resources `stage` of `cfg` will ask Ray for."""
    stage = demand_name(stage)
    if stage in ("pretrain", "finetune"):
        t = cfg.train
        workers = t.num_workers if stage == "pretrain" else (cfg.finetune.num_workers or t.num_workers)
        bundle = {"CPU": t.cpus_per_worker} | ({"GPU": t.gpus_per_worker} if t.use_gpu else {})
        knobs = "train.num_workers, train.cpus_per_worker" + (", train.gpus_per_worker" if t.use_gpu else "")
        if stage == "finetune":
            knobs = "finetune.num_workers, " + knobs
        # Pretraining streams its blocks through Ray Data, whose tasks need a whole free CPU: with every
        # CPU held by train workers the run deadlocks (ARCHITECTURE.md, measured).
        extra = [{"CPU": 1.0}] if stage == "pretrain" else []
        return Demand(stage, [bundle] * workers, t.placement_strategy, knobs, extra, "for Ray Data's tasks")
    if stage == "serve":
        s = cfg.serve
        replica = {"CPU": s.num_cpus_per_replica} | (
            {"GPU": s.num_gpus_per_replica} if s.num_gpus_per_replica else {}
        )
        # The OpenAI routes live on the model replicas (one deployment): nothing else to place.
        return Demand(
            stage,
            [replica] * max(1, s.min_replicas),
            "SPREAD",
            "serve.min_replicas, serve.num_cpus_per_replica, serve.num_gpus_per_replica",
        )
    # data and eval run Ray Data tasks / one evaluation task of one CPU each.
    return Demand(stage, [{"CPU": 1.0}], "PACK", "cluster.local_num_cpus or the cluster's nodes")


# ---- placement ---------------------------------------------------------------------------------------
def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v)


def _take(bundle: dict[str, float], free: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def place(demand: Demand, nodes: list[dict[str, float]]) -> list[int] | None:
    """A node index per bundle (workers first, then `extra`), or None when the demand cannot be placed.

    Ray's placement groups: PACK and SPREAD place each bundle on any node with room (first fit here);
    STRICT_PACK needs one node for all bundles; STRICT_SPREAD one distinct node per bundle.
    """
    free = [dict(n) for n in nodes]
    where: list[int] = []
    if demand.strategy == "STRICT_PACK":
        total: dict[str, float] = {}
        for b in demand.bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        host = next((i for i, n in enumerate(free) if _fits(total, n)), None)
        if host is None:
            return None
        _take(total, free[host])
        where = [host] * len(demand.bundles)
    else:
        used: set[int] = set()
        for b in demand.bundles:
            order = range(len(free))
            if demand.strategy in ("SPREAD", "STRICT_SPREAD"):  # least-used nodes first
                order = sorted(order, key=lambda i: (i in used, where.count(i)))
            strict = demand.strategy == "STRICT_SPREAD"
            pick = next((i for i in order if _fits(b, free[i]) and not (strict and i in used)), None)
            if pick is None:
                return None
            _take(b, free[pick])
            used.add(pick)
            where.append(pick)
    for b in demand.extra:
        pick = next((i for i, n in enumerate(free) if _fits(b, n)), None)
        if pick is None:
            return None
        _take(b, free[pick])
        where.append(pick)
    return where


def describe_nodes(nodes: list[dict[str, float]]) -> str:
    """'3 nodes (2 + 2 + 2 CPU, 0 GPU)' and any custom resources."""
    if not nodes:
        return "no alive nodes"
    cpus = " + ".join(f"{n.get('CPU', 0):g}" for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    custom = sorted({k for n in nodes for k in n if not _builtin(k)})
    more = "".join(f", {k}: {sum(n.get(k, 0) for n in nodes):g}" for k in custom)
    return f"{len(nodes)} node(s) ({cpus} CPU, {gpus:g} GPU{more})"


def _builtin(key: str) -> bool:
    return key in ("CPU", "GPU", "memory", "object_store_memory") or key.startswith("node:") or (
        key.startswith("accelerator_type:")
    )


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster (ray.init must have run)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


# ---- autoscaler ------------------------------------------------------------------------------------
# Every Ray head runs the autoscaler's monitor; without a cluster config it drives Ray's read-only
# provider, which only mirrors the nodes that exist and names each `node_<node id>`
# (`ray.autoscaler._private.util.format_readonly_node_type`). An autoscaler that can add nodes (KubeRay's
# `enableInTreeAutoscaling` sidecar, `ray up`) reports its configured node types instead: KubeRay's
# `headgroup` and worker group names.
_READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]+$")


def provisions_nodes(node_types: set[str]) -> bool:
    """Whether an autoscaler reporting these node types can launch nodes (not the read-only mirror)."""
    return any(t and not _READONLY_NODE_TYPE.match(t) for t in node_types)


def node_types_in_status(status: dict[str, Any]) -> set[str]:
    """Node types named in autoscaler v1's status (internal KV `__autoscaling_status`, what `ray status`
    prints): active, idle, pending and failed nodes, launches in flight."""
    report = status.get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    types |= set(report.get("pending_launches") or {})
    types |= set((report.get("node_type_mapping") or {}).values())
    for ip_type_and_more in (report.get("pending_nodes") or []) + (report.get("failed_nodes") or []):
        types.add(ip_type_and_more[1])
    return types


def autoscaler_node_types() -> set[str]:
    """Node types the connected cluster's autoscaler reports (autoscaler v1 or v2); empty when it has
    reported nothing yet (a head started with `--no-monitor` never does)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get, internal_kv_get_gcs_client

    gcs = internal_kv_get_gcs_client()
    if is_autoscaler_v2(fetch_from_server=True, gcs_client=gcs):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(gcs.address)
        nodes = status.active_nodes + status.idle_nodes + status.pending_nodes
        launches = status.pending_launches + status.failed_launches
        return {n.ray_node_type_name for n in nodes} | {r.ray_node_type_name for r in launches}
    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    return node_types_in_status(json.loads(raw)) if raw else set()


def has_autoscaler(cfg: RunConfig) -> bool:
    """`cluster.autoscaler` when set to true/false; on `auto`, whether the cluster can add nodes.

    An embedded Ray (no `cluster.address`, no RAY_ADDRESS) is this machine alone. A cluster whose
    autoscaler state cannot be read is treated as fixed: failing fast names the override.
    """
    setting = cfg.cluster.autoscaler
    if setting != "auto":
        return bool(setting)
    if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        return False
    try:
        return provisions_nodes(autoscaler_node_types())
    except Exception:  # noqa: BLE001 - an unreadable state must not hide the capacity message
        return False


def _refusal(demand: Demand, nodes: list[dict[str, float]], waited_s: float | None = None) -> str:
    waited = ""
    if waited_s is not None:
        waited = f" after waiting {waited_s:.0f} s (cluster.resource_wait_timeout_s)"
    return (
        f"the cluster cannot hold this run{waited}: asked {demand.describe()}; "
        f"the cluster has {describe_nodes(nodes)}. Change {demand.settings}, or add nodes"
        + ("." if waited_s is not None else " (or cluster.autoscaler: true to wait for an autoscaler).")
    )


def check_fits(cfg: RunConfig, stage: str, nodes: list[dict[str, float]]) -> None:
    """Raise PreflightError unless `stage`'s demand fits `nodes` (for `raylm submit`, which sees the
    cluster's nodes through the State API instead of a Ray connection)."""
    demand = stage_demand(cfg, stage)
    if place(demand, nodes) is None:
        raise PreflightError(_refusal(demand, nodes))


def check_capacity(cfg: RunConfig, stage: str, console: Console | None = None) -> list[int]:
    """Raise PreflightError unless `stage`'s demand fits (now, or within the autoscaler wait)."""
    demand = stage_demand(cfg, stage)
    nodes = alive_nodes()
    where = place(demand, nodes)
    if where is not None:
        return where
    if not has_autoscaler(cfg):
        raise PreflightError(_refusal(demand, nodes))
    return _wait_for_autoscaler(cfg, demand, console or Console(stderr=True))


def _wait_for_autoscaler(cfg: RunConfig, demand: Demand, console: Console) -> list[int]:
    from ray.autoscaler.sdk import request_resources

    timeout = cfg.cluster.resource_wait_timeout_s
    started = time.monotonic()
    request_resources(bundles=demand.bundles + demand.extra)
    try:
        with console.status("") as status:
            while True:
                nodes = alive_nodes()
                where = place(demand, nodes)
                if where is not None:
                    return where
                waited = time.monotonic() - started
                if waited >= timeout:
                    raise PreflightError(_refusal(demand, nodes, waited))
                status.update(
                    f"waiting for the autoscaler to add nodes for {demand.describe()}; the cluster has "
                    f"{describe_nodes(nodes)} ({waited:.0f}/{timeout:.0f} s, cluster.resource_wait_timeout_s)"
                )
                time.sleep(min(POLL_S, timeout - waited))
    finally:
        request_resources(bundles=[])  # the run's own actors hold the nodes from here on


# ---- memory ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per worker and per node for one training stage, from DeepSpeed's estimators."""

    stage: str
    params: int
    trainable: int  # all parameters, or only the LoRA adapters
    states_per_worker: int  # model states a worker's device holds (on CPU: host memory)
    host_states_per_node: int  # offloaded / host-side states per node
    activations_per_worker: int
    workers_per_node: int
    node_budget: int
    budget_source: str

    on_gpu: bool
    gpu_budget: int | None  # cluster.gpu_memory_gb, when given

    @property
    def per_worker(self) -> int:
        return self.states_per_worker + self.activations_per_worker

    @property
    def per_node(self) -> int:
        """Host memory per node: on GPU runs only the host-side states, on CPU runs everything."""
        on_host = 0 if self.on_gpu else self.workers_per_node * self.per_worker
        return self.host_states_per_node + on_host

    def _params(self) -> str:
        lora = f" ({self.trainable / 1e6:.3f}M trainable)" if self.trainable != self.params else ""
        return f"{self.params / 1e6:.2f}M params{lora}"

    def summary(self) -> str:
        return (
            f"memory estimate ({self.stage}): {self._params()}; per worker {_gib(self.states_per_worker)} "
            f"model states + {_gib(self.activations_per_worker)} activations; per node "
            f"({self.workers_per_node} worker(s)) {_gib(self.per_node)} of {_gib(self.node_budget)} "
            f"({self.budget_source})" + (" in host memory" if self.on_gpu else "")
        )

    def short(self) -> str:
        """One line for the end-of-run summary: 'est. 0.41 GiB/node of 15.0 GiB, 0.10 GiB/worker'."""
        gpu = f", {_gib(self.per_worker)}/GPU" if self.on_gpu else f", {_gib(self.per_worker)}/worker"
        return f"est. {_gib(self.per_node)}/node of {_gib(self.node_budget)}{gpu} · {self._params()}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"per_worker": self.per_worker, "per_node": self.per_node}


def _gib(n: int) -> str:
    return f"{n / GIB:.3f} GiB" if n < GIB else f"{n / GIB:.1f} GiB"


class _VocabOnly:
    """What `jobs.model.hf_config` reads from a tokenizer, before one exists: the configured vocab size
    (an upper bound for a char tokenizer) and no special ids."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


@dataclass(frozen=True)
class _Shape:
    """What the estimate needs of one stage's model and batches."""

    total: int
    largest: int  # parameters of the largest layer (ZeRO-3 gathers one at a time)
    trainable: int
    hidden: int
    heads: int
    layers: int
    vocab: int
    seq_len: int
    micro_batch: int


def _finetune_base_config(cfg: RunConfig) -> Any:
    """The transformers config fine-tuning will start from, without exporting or training anything:
    `finetune.base` (an HF folder or a run folder's export), else this run's pretrained export, else
    the model this run's `train` will pretrain (the pipeline checks before that model exists)."""
    from transformers import AutoConfig

    from data_pipelines.layout import RunLayout
    from jobs.model import hf_config

    ft = cfg.finetune
    if ft.task == "seq2seq" and ft.base is None:
        kwargs = {"vocab_size": cfg.tokenizer.vocab_size, **ft.seq2seq_model}
        return AutoConfig.for_model(kwargs.pop("model_type", "t5"), **kwargs)
    base = Path(ft.base) if ft.base else Path(cfg.run_dir())
    for folder in (base, RunLayout(base).pretrained):
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder, local_files_only=True)
    return hf_config(cfg.model, _VocabOnly(cfg.tokenizer.vocab_size), cfg.data.seq_len)


def _lora_params(model: Any, targets: list[str], rank: int) -> int:
    """Adapter parameters peft adds: r·(in + out) per targeted Linear (matched by its last name part)."""
    import torch

    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def _shape(cfg: RunConfig, stage: str) -> _Shape:
    """Parameters (total, largest layer, trainable) of `stage`'s model, built on the meta device (no
    memory), and the batch it trains on.

    Counted here rather than with DeepSpeed's `model_to_params`, which tells parameters apart by
    `data_ptr()`: every meta tensor has the same one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from jobs.model import hf_config

    if stage == "finetune":
        config = _finetune_base_config(cfg)
        seq_len, micro_batch = cfg.finetune.max_seq_len, cfg.finetune.micro_batch_size
    else:
        config = hf_config(cfg.model, _VocabOnly(cfg.tokenizer.vocab_size), cfg.data.seq_len)
        seq_len, micro_batch = cfg.data.seq_len, cfg.train.micro_batch_size
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters counted once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    trainable = total
    if stage == "finetune" and cfg.finetune.method == "lora":
        trainable = _lora_params(model, cfg.finetune.lora_target_modules, cfg.finetune.lora_r)
        total += trainable
    layers = config.num_hidden_layers + (getattr(config, "num_decoder_layers", 0) or 0)
    return _Shape(
        total, largest, trainable, config.hidden_size, config.num_attention_heads, layers,
        config.vocab_size, seq_len, micro_batch,
    )  # fmt: skip


def _train_settings(cfg: RunConfig, stage: str) -> Any:
    """The engine settings the stage trains with (fine-tuning adjusts `train`'s, e.g. LoRA at ZeRO <= 2)."""
    if stage == "finetune":
        from jobs.finetune import finetune_train_config

        return finetune_train_config(cfg)
    return cfg.train


def estimate_memory(
    cfg: RunConfig, workers_per_node: int, nodes: list[dict[str, float]], stage: str = "pretrain"
) -> MemoryEstimate:
    """Model states (DeepSpeed's estimators for the ZeRO stage and offload) + activations per worker.

    The estimators count one "GPU" per worker and assume every parameter trains; on CPU that device
    memory is host memory too. ZeRO-3 on CPU keeps a small model's weights whole on every worker
    (`jobs.deepspeed_config.zero3_persistence`), which the estimator does not know: they are added. With
    LoRA they count the adapters, and the frozen base adds its weights once per worker (LoRA runs at
    ZeRO <= 2, which does not partition parameters).
    Activations follow Korthikanti et al. (2022) for one transformer layer without recomputation,
    s·b·h·(34 + 5·a·s/h) bytes at 16-bit, scaled to the element size, plus the logits and their grad;
    with activation checkpointing, each layer's input plus one layer recomputed.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from jobs.deepspeed_config import zero3_whole_elements

    t, shape = _train_settings(cfg, stage), _shape(cfg, stage)
    num_nodes = max(1, math.ceil(t.num_workers / workers_per_node))
    trainable = shape.trainable
    if t.zero_stage == 3:
        largest = min(shape.largest, trainable)
        host, device, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest, workers_per_node, num_nodes, t.offload_optimizer, t.offload_params
        )
        device += zero3_whole_elements(t, trainable) * 4  # kept whole on every worker (fp32 on CPU)
    else:  # stages 1 and 2 partition less than 3 does; stage 0 partitions nothing (= one worker)
        partitioned = t.zero_stage > 0
        host, device = estimate_zero2_model_states_mem_needs(
            trainable,
            workers_per_node if partitioned else 1,
            num_nodes if partitioned else 1,
            t.offload_optimizer,
        )
    elem = 4 if not t.use_gpu or t.precision == "fp32" else 2
    device += (shape.total - trainable) * elem  # a frozen base (LoRA): weights only
    s, b, h, a = shape.seq_len, shape.micro_batch, shape.hidden, shape.heads
    per_layer = s * b * h * (34 + 5 * a * s / h) * elem / 2
    logits = 2 * b * s * shape.vocab * 4
    if t.activation_checkpointing:  # keeps each layer's input; recomputes one layer at a time
        activations = int(shape.layers * s * b * h * elem + per_layer + logits)
    else:
        activations = int(shape.layers * per_layer + logits)
    if cfg.cluster.node_memory_gb is not None:
        budget, source = int(cfg.cluster.node_memory_gb * GIB), "cluster.node_memory_gb"
    else:
        budget = int(min((n.get("memory", 0) for n in nodes), default=0))
        source = "the smallest node's Ray memory"
    gpu_budget = int(cfg.cluster.gpu_memory_gb * GIB) if cfg.cluster.gpu_memory_gb else None
    return MemoryEstimate(
        demand_name(stage), shape.total, trainable, int(device), int(host),
        activations, workers_per_node, budget, source, t.use_gpu, gpu_budget,
    )  # fmt: skip


def check_memory(
    cfg: RunConfig, where: list[int], nodes: list[dict[str, float]], stage: str = "pretrain"
) -> MemoryEstimate:
    """Raise PreflightError when the estimate for the busiest node exceeds its memory budget."""
    workers = where[: len(stage_demand(cfg, stage).bundles)]
    per_node = max((workers.count(i) for i in set(workers)), default=1)
    est = estimate_memory(cfg, per_node, nodes, stage)
    sec = "finetune" if stage == "finetune" else "train"
    smaller = f"{sec}.micro_batch_size" + (", finetune.method: lora" if sec == "finetune" else "")
    if est.node_budget and est.per_node > est.node_budget:
        raise PreflightError(
            f"the run needs about {_gib(est.per_node)} per node but a node has {_gib(est.node_budget)} "
            f"({est.budget_source}): {est.summary()}. Lower {smaller} or the model size, "
            f"use a higher train.zero_stage or train.offload_optimizer/offload_params, or spread "
            f"{sec}.num_workers over more nodes (train.placement_strategy: SPREAD)."
        )
    if est.on_gpu and est.gpu_budget and est.per_worker > est.gpu_budget:
        raise PreflightError(
            f"the run needs about {_gib(est.per_worker)} per GPU but a GPU has {_gib(est.gpu_budget)} "
            f"(cluster.gpu_memory_gb): {est.summary()}. Lower {smaller}, use "
            f"train.zero_stage 3 or train.offload_optimizer/offload_params, or add GPUs."
        )
    return est


def estimate_path(cfg: RunConfig, stage: str) -> Path:
    """`<run>/preflight/memory_<stage>.json` in this process's copy of the run folder."""
    from data_pipelines.layout import RunLayout
    from jobs.pretrain import local_run_dir

    return RunLayout(local_run_dir(cfg)).memory_estimate(demand_name(stage))


def read_estimate(cfg: RunConfig, stage: str) -> MemoryEstimate | None:
    """The estimate the last preflight of `stage` wrote, for the end-of-run summary."""
    path = estimate_path(cfg, stage)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return MemoryEstimate(**{k: v for k, v in data.items() if k in MemoryEstimate.__dataclass_fields__})


def preflight(cfg: RunConfig, stage: str, console: Console | None = None) -> MemoryEstimate | None:
    """Every check for `stage`, on the Ray the command has joined or started; prints the memory
    estimate of training stages and writes it to `estimate_path`. Raises PreflightError (exit 2)
    when the run can never start."""
    console = console or Console()
    where = check_capacity(cfg, stage, console)
    if demand_name(stage) not in ("pretrain", "finetune"):
        return None
    try:
        est = check_memory(cfg, where, alive_nodes(), stage)
    except (ValueError, TypeError, OSError) as exc:  # no model class / unreadable base: the run says so
        console.print(f"[dim]memory estimate skipped: {exc}[/]", highlight=False)
        return None
    console.print(f"[dim]{est.summary()}[/]", highlight=False)
    path = estimate_path(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(est.to_json(), indent=2))
    return est


def join_and_check(cfg: RunConfig, stage: str, console: Console | None = None) -> None:
    """Start or join Ray for `cfg`, then `preflight` `stage`: the one call a command makes first."""
    from cluster.local_ray import ensure_ray

    ensure_ray(cfg.cluster)
    preflight(cfg, stage, console)


def preflight_pipeline(cfg: RunConfig, console: Console | None = None) -> None:
    """`raylm pipeline` runs every stage: check each demand (and training memory) before the first."""
    for stage in ("tokens", "serve"):
        check_capacity(cfg, stage, console)
    preflight(cfg, "pretrain", console)
    preflight(cfg, "finetune", console)
