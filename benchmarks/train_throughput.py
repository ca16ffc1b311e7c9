"""Training throughput: plain PyTorch vs raylm (Ray Train + DeepSpeed) on the same model, data, optimizer.

Two model sizes, each against a plain PyTorch loop over the same model, rows and torch AdamW measured
in the same run (re-measured right before each raylm run: a shared machine drifts between minutes):

  12.5M  Llama 8 x 320, seq 256, global batch 8, BPE-4096, random tokens (from memory, two epochs);
         raylm 1 worker ZeRO-0 (all cores) and 2 workers ZeRO-3 (one core each); --variants adds ZeRO-1.
  0.8M   Llama 4 x 128, seq 64, micro batch 12, char tokenizer, 2 threads; raylm 1 worker ZeRO-0 fed
         by the real streamed data pipeline (read → tokenise → pack) over a slice of tinyshakespeare,
         sized so the run crosses an epoch boundary (the plain loop gets the same packed rows).

Each setting runs `--rounds` times (default 3); the tables print the median tokens/s and the median
ratio to plain PyTorch. Rates are steady state: the first `warmup` steps are excluded, and raylm rates
come from the workers' own timestamps (`train_time_s` in metrics.jsonl), so Ray/DeepSpeed start-up is
not counted, but an epoch boundary is. "longest step" is the longest wall interval between two
consecutive logged steps after warm-up (log_every=1), including the epoch boundary, and "boundary" the
interval of the step that crossed it. "start" is the launch → first logged step time of the run.

    python benchmarks/train_throughput.py [--sizes 12.5M,0.8M] [--rounds 3] [--variants] [--json out.json]
    python benchmarks/train_throughput.py --rounds 1 --scale 0.1   # does it work? (figures meaningless)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.config import RunConfig, load_config
from data_pipelines.config import TokenizerConfig
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer
from jobs.metrics import startup_timings
from jobs.model import FlopsSpec, build_model, count_params, hf_config

SHAKESPEARE = Path(__file__).resolve().parents[1] / "third_party" / "tinyshakespeare" / "tinyshakespeare.txt"


@dataclass(frozen=True)
class Size:
    """One model size and how it is fed and measured."""

    model: dict[str, Any]
    seq_len: int
    global_batch: int
    steps: int
    warmup: int
    settings: tuple[tuple[str, int, int], ...]  # (name, workers, ZeRO stage)
    variants: tuple[tuple[str, int, int], ...] = ()
    threads: int | None = None  # intra-op threads in total (None = all cores)
    corpus_chars: int = 0  # > 0: stream this many characters of tinyshakespeare through the pipeline


SIZES = {
    "12.5M": Size(
        model={"model.hidden_size": 320, "model.num_layers": 8, "model.num_heads": 5,
               "model.intermediate_size": 864, "model.max_position_embeddings": 256},
        seq_len=256, global_batch=8, steps=24, warmup=6,
        settings=(("1worker_zero0", 1, 0), ("2workers_zero3", 2, 3)),
        variants=(("2workers_zero1", 2, 1),),
    ),
    "0.8M": Size(
        model={"model.hidden_size": 128, "model.num_layers": 4, "model.num_heads": 4,
               "model.intermediate_size": 344, "model.max_position_embeddings": 64},
        seq_len=64, global_batch=12, steps=400, warmup=40, threads=2, corpus_chars=180_000,
        settings=(("1worker_zero0", 1, 0),),
    ),
}


def run_config(root: Path, name: str, size: Size, workers: int, stage: int, threads: int) -> RunConfig:
    sets = {
        **size.model,
        "data.seq_len": size.seq_len,
        "data.paths": f"[{root / 'corpus.txt'}]",
        "data.val_fraction": 0.0,
        "tokenizer.kind": "char",
        "tokenizer.vocab_size": 128,
        "tokenizer.min_frequency": 1,
        "cluster.storage_path": str(root),
        "cluster.run_name": name,
        "train.num_workers": workers,
        "train.cpus_per_worker": 1,
        "train.torch_threads": threads,
        "train.zero_stage": stage,
        "train.micro_batch_size": size.global_batch // workers,
        "train.max_steps": size.steps,
        "train.log_every": 1,
        "train.eval_every": 10**6,
        "train.checkpoint_every": 10**6,
        "train.warmup_steps": 2,
        "train.max_failures": 0,
    }
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def plain_pytorch(cfg: RunConfig, tokenizer_dir: str, rows: np.ndarray, size: Size, threads: int) -> float:
    """The reference loop a researcher would write: no Ray, no DeepSpeed; rows cycle like epochs."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(hf_config(cfg.model, load_tokenizer(tokenizer_dir), size.seq_len)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=0.1)
    data = torch.from_numpy(rows).long()
    per_epoch = len(data) // size.global_batch
    start = 0.0
    for step in range(size.steps):
        if step == size.warmup:
            start = time.perf_counter()
        i = step % per_epoch
        ids = data[i * size.global_batch : (i + 1) * size.global_batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (size.steps - size.warmup) * size.global_batch * size.seq_len / (time.perf_counter() - start)


def raylm(cfg: RunConfig, tokenizer_dir: str, train_ds: Any, size: Size) -> dict[str, float]:
    """The real pretraining path: steady-state rate, longest step interval, start-up."""
    from jobs.pretrain import train

    result = train(cfg, train_ds, None, tokenizer_dir, size.seq_len, export_model=False, progress=False)
    recs = [r for r in result.metrics if r["event"] == "train"]
    by_step = {r["step"]: r for r in recs}
    first, last = by_step[size.warmup], by_step[size.steps]
    rate = (last["tokens_seen"] - first["tokens_seen"]) / (last["train_time_s"] - first["train_time_s"])
    steady = [r for r in recs if r["step"] >= size.warmup]
    gaps = [(b["time"] - a["time"], b) for a, b in zip(steady, steady[1:], strict=False)]
    crossing = [g for g, b in gaps if b["epoch"] != by_step[b["step"] - 1]["epoch"]]
    return {
        "tokens_per_s": rate,
        "longest_step_s": max(g for g, _ in gaps),
        "median_step_s": statistics.median(g for g, _ in gaps),
        "boundary_step_s": max(crossing) if crossing else float("nan"),
        "epochs": last["epoch"],
        "start_s": startup_timings(result.metrics).get("fit_to_first_step_s", float("nan")),
    }


def size_data(size: Size, root: Path, cfg: RunConfig) -> tuple[str, Any, np.ndarray]:
    """(tokenizer dir, a function giving the raylm train dataset, the same rows for plain PyTorch)."""
    import ray.data

    if size.corpus_chars:
        # The real streamed pipeline over a corpus sized to cross an epoch boundary mid-run.
        from data_pipelines.pipeline import token_datasets

        td = token_datasets(cfg.data, cfg.tokenizer, cfg.run_dir())
        rows = np.stack([r["input_ids"] for r in td.train.take_all()])
        return td.tokenizer_dir, lambda: token_datasets(cfg.data, cfg.tokenizer, cfg.run_dir()).train, rows
    tok_dir = str(train_tokenizer([SHAKESPEARE.read_text(encoding="utf-8")[:300_000]],
                                  TokenizerConfig(kind="bpe", vocab_size=4096), root / "tok"))
    vocab = len(load_tokenizer(tok_dir))
    # Half the rows the run needs: it crosses an epoch boundary halfway through.
    shape = (size.steps * size.global_batch // 2, size.seq_len)
    rows = np.random.default_rng(0).integers(0, vocab, shape, dtype=np.int32)
    return tok_dir, lambda: ray.data.from_items([{"input_ids": row} for row in rows]), rows


def bench_size(label: str, size: Size, root: Path, rounds: int, variants: bool) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    threads = size.threads or cores
    root = root / label
    root.mkdir(parents=True)
    (root / "corpus.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[: size.corpus_chars or 1000])
    base = run_config(root, "prep", size, 1, 0, threads)
    tok_dir, train_ds, rows = size_data(size, root, base)
    model = build_model(hf_config(base.model, load_tokenizer(tok_dir), size.seq_len))
    flops = FlopsSpec.of(model.config, count_params(model), size.seq_len).flops_per_token()
    per_epoch = len(rows) // size.global_batch
    print(f"\n== {label}: {count_params(model) / 1e6:.2f}M parameters, seq {size.seq_len}, global batch "
          f"{size.global_batch}, {size.steps} steps ({per_epoch} per epoch), {threads} threads in total")
    settings = size.settings + (size.variants if variants else ())
    out: dict[str, Any] = {"params": count_params(model), "flops_per_token": flops, "settings": {}}
    for name, workers, stage in settings:
        runs, plains = [], []
        for r in range(rounds):
            plains.append(plain_pytorch(base, tok_dir, rows, size, threads))
            cfg = run_config(root, f"{name}-{r}", size, workers, stage, max(1, threads // workers))
            runs.append(raylm(cfg, tok_dir, train_ds(), size))
            print(f"  {name} round {r + 1}: {runs[-1]['tokens_per_s']:,.0f} tok/s; plain just before "
                  f"{plains[-1]:,.0f}; longest step {runs[-1]['longest_step_s'] * 1e3:.0f} ms", flush=True)
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        out["settings"][name] = {
            **med,
            "plain_tokens_per_s": statistics.median(plains),
            "ratio_to_plain": statistics.median(run["tokens_per_s"] / p for run, p in zip(runs, plains,
                                                                                          strict=True)),
            "rounds": runs,
        }
    print(f"  {'setting':16} {'tok/s':>9} {'plain':>9} {'ratio':>6} {'step ms':>8} {'longest':>8} "
          f"{'boundary':>9} {'start s':>8}")
    for name, s in out["settings"].items():
        print(f"  {name:16} {s['tokens_per_s']:9,.0f} {s['plain_tokens_per_s']:9,.0f} "
              f"{s['ratio_to_plain']:5.2f}x {s['median_step_s'] * 1e3:8.0f} {s['longest_step_s'] * 1e3:8.0f} "
              f"{s['boundary_step_s'] * 1e3:9.0f} {s['start_s']:8.1f}")
    best = max(out["settings"], key=lambda k: out["settings"][k]["ratio_to_plain"])
    out["best"] = {"setting": best, "ratio_to_plain": out["settings"][best]["ratio_to_plain"]}
    print(f"  best: {best} at {out['best']['ratio_to_plain']:.2f}x of plain PyTorch (target >= 0.9x)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--rounds", type=int, default=3, help="runs per setting; medians are printed")
    parser.add_argument("--variants", action="store_true", help="also 2 workers with ZeRO-1 (12.5M)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="scale steps, warm-up and corpus (e.g. 0.1 to check the script works)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    from cluster.config import ClusterConfig
    from cluster.local_ray import ensure_ray

    ensure_ray(ClusterConfig())
    root = Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    report = {}
    for label in args.sizes.split(","):
        size = SIZES[label]
        if args.scale != 1.0:  # a smoke check: fewer steps and a smaller corpus, same shape of run
            warmup = max(1, round(size.warmup * args.scale))
            size = replace(size, steps=max(warmup + 4, round(size.steps * args.scale)), warmup=warmup,
                           corpus_chars=round(size.corpus_chars * args.scale))
        report[label] = bench_size(label, size, root, args.rounds, args.variants)
    if "12.5M" in report:
        zero3 = report["12.5M"]["settings"].get("2workers_zero3")
        if zero3:
            ratio = zero3["ratio_to_plain"]
            print(f"12.5M 2 workers ZeRO-3: {ratio:.2f}x of plain PyTorch (target >= 0.85x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
