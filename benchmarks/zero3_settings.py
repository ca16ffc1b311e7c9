"""ZeRO-3 settings A/B outside Ray: seconds per step of two gloo processes on the 12.5M model.

Isolates DeepSpeed's own per-step host work (module hooks, parameter fetch bookkeeping, gradient
partitioning) from Ray Train and Ray Data: two local processes, one intra-op thread each, the model of
`train_throughput.py`'s 12.5M size (Llama 8 x 320, vocab 4096, seq 256, micro batch 4 per process =
global batch 8, random tokens), through raylm's own `deepspeed_config` with DeepSpeed's default
ZeRO-3 settings and the named `zero_optimization` overrides on top. Settings run in alternating
rounds (a shared machine drifts); the table prints rank 0's median wall and CPU seconds per step
after warm-up (CPU time: what the process itself spent, steadier than wall time when other jobs
share the cores) and the last loss (equal losses = same numerics).

    python benchmarks/zero3_settings.py [--rounds 2] [--steps 12] [--settings base,leaf_layers]
"""

from __future__ import annotations

import argparse
import importlib
import os
import queue
import socket
import statistics
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from cluster.config import load_config
from jobs.deepspeed_config import deepspeed_config

VOCAB, SEQ, MICRO, WORKERS, WARMUP = 4096, 256, 4, 2, 3

# name → (zero_optimization overrides, module classes made ZeRO-3 leaves)
SETTINGS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "base": ({}, []),
    "leaf_layers": ({}, ["LlamaDecoderLayer"]),
    # These two fail in DeepSpeed 0.19.8 on CPU (`zero_grad` calls record_stream on a CPU tensor),
    # listed so the table shows it: nan.
    "leaf_model": ({}, ["LlamaForCausalLM"]),
    "granularity_1e9": ({"stage3_module_granularity_threshold": 10**9}, []),
    "persist_5e7": ({"stage3_param_persistence_threshold": 5 * 10**7}, []),
    "persist+leaf_layers": ({"stage3_param_persistence_threshold": 5 * 10**7}, ["LlamaDecoderLayer"]),
    "persist+native_linear": ({"stage3_param_persistence_threshold": 5 * 10**7,
                               "memory_efficient_linear": False}, []),
    "persist+native_linear+leaf_layers": ({"stage3_param_persistence_threshold": 5 * 10**7,
                                           "memory_efficient_linear": False}, ["LlamaDecoderLayer"]),
    "no_prefetch": ({"stage3_prefetch_bucket_size": 0}, []),
    "persist+no_prefetch": ({"stage3_param_persistence_threshold": 5 * 10**7,
                             "stage3_prefetch_bucket_size": 0}, []),
    "big_buckets": ({"reduce_bucket_size": 10**9, "allgather_bucket_size": 10**9}, []),
    "allreduce_fetch": ({"stage3_use_all_reduce_for_fetch_params": True}, []),
    "leaf_layers+no_prefetch": ({"stage3_prefetch_bucket_size": 0}, ["LlamaDecoderLayer"]),
    # Not ZeRO-3: the data-parallel floor (gradients all-reduced, optimizer state partitioned).
    "zero1": ({"stage": 1}, []),
}


def _worker(rank: int, port: int, setting: str, steps: int, out: Any) -> None:
    import deepspeed
    import torch.distributed as dist
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORKERS), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = load_config(None, ["train.zero_stage=3", f"train.micro_batch_size={MICRO}"]).train
    ds = deepspeed_config(cfg, WORKERS)
    overrides, leaves = SETTINGS[setting]
    # Start from DeepSpeed's own defaults, not raylm's CPU choice of persistence thresholds.
    for key in ("stage3_param_persistence_threshold", "stage3_model_persistence_threshold"):
        ds["zero_optimization"].pop(key, None)
    ds["zero_optimization"].update(overrides)
    importlib.import_module("torch._dynamo")
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 - makes from_config build under zero.Init
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=320, num_hidden_layers=8,
                                      num_attention_heads=5, intermediate_size=864,
                                      max_position_embeddings=SEQ, use_cache=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if leaves:
        classes = [getattr(transformers.models.llama.modeling_llama, c) for c in leaves]
        deepspeed.utils.set_z3_leaf_modules(model, classes)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    rows = torch.randint(0, VOCAB, (24, SEQ), generator=torch.Generator().manual_seed(0))
    times, cpu, loss = [], [], float("nan")
    for step in range(steps):
        i = (step * WORKERS + rank) % (len(rows) // MICRO)
        ids = rows[i * MICRO:(i + 1) * MICRO]
        t0, c0 = time.perf_counter(), time.process_time()
        out_loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(out_loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        loss = out_loss.item()
    if rank == 0:
        out.put((statistics.median(times[WARMUP:]), statistics.median(cpu[WARMUP:]), loss))
    dist.destroy_process_group()


def run(setting: str, steps: int) -> tuple[float, float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, setting, steps, out)) for r in range(WORKERS)]
    for p in procs:
        p.start()
    while True:  # a worker that dies (a setting DeepSpeed rejects) must not leave us waiting
        try:
            result = out.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                return float("nan"), float("nan"), float("nan")
    for p in procs:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help=f"per run; the first {WARMUP} are warm-up")
    args = parser.parse_args()
    names = args.settings.split(",")
    results: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            wall, cpu, loss = run(name, args.steps)
            results[name].append((wall, cpu, loss))
            print(f"round {r + 1} {name:24} wall {wall:.3f} cpu {cpu:.3f} s/step loss {loss:.5f}", flush=True)
    base_cpu = statistics.median(run[1] for run in results[names[0]])
    print(f"\n{'setting':24} {'wall s':>7} {'cpu s':>7} {'cpu vs ' + names[0]:>12} {'last loss':>10}")
    for name, runs in results.items():
        wall, cpu = (statistics.median(run[i] for run in runs) for i in (0, 1))
        print(f"{name:24} {wall:7.3f} {cpu:7.3f} {base_cpu / cpu - 1:+11.1%} {runs[-1][2]:10.5f}")


if __name__ == "__main__":
    main()
