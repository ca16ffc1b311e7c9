"""Training throughput: plain PyTorch vs raylm (Ray Train + DeepSpeed) on the same tiny Llama.

Same model (~12M parameters, seq_len 256), same global batch, same number of steps, random tokens:
  (a) one process, torch.optim.AdamW, all cores as intra-op threads;
  (b) raylm, 1 worker (ZeRO stage 0, all cores);
  (c) raylm, 2 workers, ZeRO-3 (one core each);  plus 2 workers ZeRO-1 with --variants.
Steady state only: the first `--warmup-steps` are excluded, and raylm rates come from the workers'
own timestamps (`train_time_s` in metrics.jsonl), so Ray/DeepSpeed start-up is not counted. (a) is run
again right before each raylm setting and each ratio uses that neighbouring run (shared machines drift).
MFU uses the PaLM 6N + 12·L·H·Q·T FLOPs per token against a matmul FLOP/s this script measures.

    python benchmarks/train_throughput.py [--steps 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cluster.config import RunConfig, load_config
from data_pipelines.config import TokenizerConfig
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer
from jobs.model import FlopsSpec, build_model, count_params, hf_config

SEQ_LEN = 256
SHAKESPEARE = Path(__file__).resolve().parents[1] / "third_party" / "tinyshakespeare" / "tinyshakespeare.txt"
MODEL = {
    "model.hidden_size": 320,
    "model.num_layers": 8,
    "model.num_heads": 5,
    "model.intermediate_size": 864,
    "model.max_position_embeddings": SEQ_LEN,
}


def matmul_flops(threads: int, n: int = 1024, seconds: float = 2.0) -> float:
    """Measured fp32 matmul FLOP/s with `threads` intra-op threads: the MFU denominator."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def run_config(
    root: Path, name: str, steps: int, batch: int, workers: int, stage: int, threads: int
) -> RunConfig:
    sets = {
        **MODEL,
        "data.seq_len": SEQ_LEN,
        "cluster.storage_path": str(root),
        "cluster.run_name": name,
        "train.num_workers": workers,
        "train.cpus_per_worker": 1,
        "train.torch_threads": threads,
        "train.zero_stage": stage,
        "train.micro_batch_size": batch // workers,
        "train.max_steps": steps,
        "train.log_every": 1,
        "train.eval_every": 10**6,
        "train.checkpoint_every": 10**6,
        "train.warmup_steps": 2,
        "train.max_failures": 0,
    }
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def plain_pytorch(
    cfg: RunConfig, tokenizer_dir: str, tokens: np.ndarray, batch: int, warmup: int, threads: int
) -> float:
    """(a): the reference loop a researcher would write, no Ray, no DeepSpeed."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(hf_config(cfg.model, load_tokenizer(tokenizer_dir), SEQ_LEN)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=0.1)
    data = torch.from_numpy(tokens).long()
    start = 0.0
    for step in range(cfg.train.max_steps):
        if step == warmup:
            start = time.perf_counter()
        ids = data[step * batch : (step + 1) * batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (cfg.train.max_steps - warmup) * batch * SEQ_LEN / (time.perf_counter() - start)


def raylm(cfg: RunConfig, tokenizer_dir: str, tokens: np.ndarray, warmup: int) -> float:
    """(b)/(c): the real pretraining path; steady-state rate from the workers' own timestamps."""
    import ray.data

    from jobs.pretrain import train

    train_ds = ray.data.from_items([{"input_ids": row} for row in tokens])
    result = train(cfg, train_ds, None, tokenizer_dir, SEQ_LEN, export_model=False, progress=False)
    recs = {r["step"]: r for r in result.metrics if r["event"] == "train"}
    first, last = recs[warmup], recs[cfg.train.max_steps]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["train_time_s"] - first["train_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup-steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step (even)")
    parser.add_argument("--variants", action="store_true", help="also 2 workers with ZeRO-1")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    from cluster.config import ClusterConfig
    from cluster.local_ray import ensure_ray

    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    tok_dir = str(
        train_tokenizer(
            [SHAKESPEARE.read_text(encoding="utf-8")[:300_000]],
            TokenizerConfig(kind="bpe", vocab_size=4096),
            root / "tok",
        )
    )
    vocab = len(load_tokenizer(tok_dir))
    shape = (args.steps * args.global_batch, SEQ_LEN)
    tokens = np.random.default_rng(0).integers(0, vocab, shape, dtype=np.int32)
    peak = matmul_flops(cores)
    base = run_config(root, "plain", args.steps, args.global_batch, 1, 0, cores)
    model = build_model(hf_config(base.model, load_tokenizer(tok_dir), SEQ_LEN))
    flops = FlopsSpec.of(model.config, count_params(model), SEQ_LEN).flops_per_token()
    print(
        f"model: {count_params(model) / 1e6:.1f}M parameters, {flops / 1e6:.1f} MFLOP/token; "
        f"measured matmul peak {peak / 1e9:.1f} GFLOP/s on {cores} cores"
    )

    ensure_ray(ClusterConfig())
    settings = [("b_raylm_1worker_zero0", 1, 0, cores), ("c_raylm_2workers_zero3", 2, 3, max(1, cores // 2))]
    if args.variants:
        settings.append(("d_raylm_2workers_zero1", 2, 1, max(1, cores // 2)))
    results, plains = {}, {}
    for name, workers, stage, threads in settings:
        # (a) is re-measured right before each setting: a shared machine drifts by tens of percent
        # between minutes, and each ratio should compare two runs that saw the same machine.
        plains[name] = plain_pytorch(base, tok_dir, tokens, args.global_batch, args.warmup_steps, cores)
        cfg = run_config(root, name, args.steps, args.global_batch, workers, stage, threads)
        results[name] = raylm(cfg, tok_dir, tokens, args.warmup_steps)
        print(f"{name}: {results[name]:,.0f} tok/s; (a) just before: {plains[name]:,.0f} tok/s")

    ref = statistics.median(plains.values())
    report = {
        "model_params": count_params(model),
        "seq_len": SEQ_LEN,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "matmul_flops": peak,
        "settings": {"a_plain_pytorch": {"tokens_per_s": ref, "ratio_to_a": 1.0, "mfu": ref * flops / peak}},
    }
    print(f"{'setting':28} {'tokens/s':>10} {'(a) before':>11} {'vs (a)':>8} {'MFU':>7}")
    print(f"{'a_plain_pytorch (median)':28} {ref:10,.0f} {'':>11} {1.0:8.2f} {ref * flops / peak:7.1%}")
    for name, rate in results.items():
        entry = {
            "tokens_per_s": rate,
            "plain_tokens_per_s_before": plains[name],
            "ratio_to_a": rate / plains[name],
            "mfu": rate * flops / peak,
        }
        report["settings"][name] = entry
        print(f"{name:28} {rate:10,.0f} {plains[name]:11,.0f} {entry['ratio_to_a']:8.2f} {entry['mfu']:7.1%}")
    best = max(results, key=lambda k: results[k] / plains[k])
    report["best_raylm"] = {"setting": best, "ratio_to_a": results[best] / plains[best]}
    ratio = results[best] / plains[best]
    print(f"best raylm setting: {best} at {ratio:.2f}x of plain PyTorch (target >= 0.85x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
