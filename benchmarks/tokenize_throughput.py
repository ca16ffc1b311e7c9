"""Tokenisation throughput: the Ray Data pipeline versus plain `tokenizers` in one process.

    python benchmarks/tokenize_throughput.py [--mb 50] [--rounds 3] [--json out.json]

Builds about `--mb` MB of text by repeating tinyshakespeare with per-copy perturbations (so
de-duplication keeps every copy) into several .txt files, trains one BPE tokenizer on a sample, then
tokenises the same files with both methods and prints tokens/s for both and their ratio:
  * plain: read the files, split paragraphs, `Tokenizer.encode_batch_fast` (Rust threads on all cores);
  * pipeline: `token_datasets` in stream mode, fully consumed (read, clean, hash, tokenise in parallel
    tasks, de-duplicate and pack), so the figure includes everything training would get.
Token counts include one eos per document on both sides; both sides see the same documents.

Shared machines drift by tens of percent within a minute, so the two are measured in alternating
rounds (plain, pipeline, plain, pipeline, ...) and each round's ratio uses the plain figure taken just
before it. Round 1 of the pipeline is cold: it also pays for starting Ray Data's own actors and the
first import of the data modules in each worker; later rounds show the steady state. The printed
ratio is the median over all rounds, cold one included; every round is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAKESPEARE = REPO / "third_party" / "tinyshakespeare" / "tinyshakespeare.txt"


def make_corpus(out: Path, megabytes: float, files: int, seed: int = 0) -> list[Path]:
    """~`megabytes` MB of perturbed tinyshakespeare paragraphs spread over `files` .txt files."""
    base = [p.strip() for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    handles = [open(out / f"part-{i:03d}.txt", "w", encoding="utf-8") for i in range(files)]  # noqa: SIM115
    written, copy = 0, 0
    try:
        while written < target:
            for j, para in enumerate(base):
                words = para.split(" ")
                if len(words) > 3:  # swap two words, then tag the copy: every paragraph stays unique
                    a, b = rng.randrange(len(words)), rng.randrange(len(words))
                    words[a], words[b] = words[b], words[a]
                text = f"[{copy}] " + " ".join(words)
                handles[(copy * len(base) + j) % files].write(text + "\n\n")
                written += len(text) + 2
                if written >= target:
                    break
            copy += 1
    finally:
        for h in handles:
            h.close()
    return sorted(out.glob("*.txt"))


def plain(paths: list[Path], tokenizer_json: Path, batch_docs: int) -> tuple[int, float]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    start = time.perf_counter()
    tokens = 0
    for path in paths:
        docs = [d.strip() for d in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if d.strip()]
        for i in range(0, len(docs), batch_docs):
            encodings = tok.encode_batch_fast(docs[i : i + batch_docs], add_special_tokens=False)
            tokens += sum(len(e.ids) for e in encodings) + len(encodings)
    return tokens, time.perf_counter() - start


def pipeline(
    corpus: Path, tokenizer_dir: Path, run_dir: Path, tasks: int, batch_size: int
) -> tuple[int, float]:
    from ray.data import DataContext

    from data_pipelines.config import DataConfig, TokenizerConfig
    from data_pipelines.pipeline import token_datasets

    DataContext.get_current().enable_progress_bars = False
    data = DataConfig(
        paths=[str(corpus)],
        seq_len=1024,
        val_fraction=0.0,
        tokenize_tasks=tasks,
        tokenize_batch_size=batch_size,
    )
    start = time.perf_counter()
    td = token_datasets(data, TokenizerConfig(path=str(tokenizer_dir)), str(run_dir))
    for _ in td.train.iter_batches(batch_size=None):
        pass
    elapsed = time.perf_counter() - start
    return td.stats().tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    parser.add_argument("--files", type=int, default=16, help="number of corpus files")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/pipeline rounds")
    parser.add_argument("--tasks", type=int, default=0, help="cap on concurrent tasks (0 = one per CPU)")
    parser.add_argument("--batch-size", type=int, default=2048, help="documents per batch (both sides)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    from cluster.config import ClusterConfig
    from cluster.local_ray import ensure_ray
    from data_pipelines.config import TokenizerConfig
    from data_pipelines.tokenizer import train_tokenizer

    rounds = []
    with tempfile.TemporaryDirectory(prefix="raylm-bench-") as tmp:
        root = Path(tmp)
        (root / "corpus").mkdir()
        paths = make_corpus(root / "corpus", args.mb, args.files)
        size = sum(p.stat().st_size for p in paths)
        sample = SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")
        tok_dir = train_tokenizer(sample, TokenizerConfig(vocab_size=4096), root / "tokenizer")
        print(
            f"corpus: {size / 1e6:.1f} MB in {len(paths)} files; tokenizer: BPE 4096; cpus: {os.cpu_count()}"
        )
        ensure_ray(ClusterConfig())
        for i in range(1, args.rounds + 1):
            plain_tokens, plain_s = plain(paths, tok_dir / "tokenizer.json", args.batch_size)
            pipe_tokens, pipe_s = pipeline(
                root / "corpus", tok_dir, root / f"run{i}", args.tasks, args.batch_size
            )
            r = {
                "round": i,
                "plain_tokens": plain_tokens,
                "plain_seconds": round(plain_s, 3),
                "plain_tokens_per_s": round(plain_tokens / plain_s),
                "pipeline_tokens": pipe_tokens,
                "pipeline_seconds": round(pipe_s, 3),
                "pipeline_tokens_per_s": round(pipe_tokens / pipe_s),
            }
            r["ratio"] = round(r["pipeline_tokens_per_s"] / r["plain_tokens_per_s"], 3)
            rounds.append(r)
            print(
                f"round {i}{' (cold)' if i == 1 else ''}: plain {r['plain_tokens_per_s']:,} tok/s "
                f"({plain_s:.1f}s)  pipeline {r['pipeline_tokens_per_s']:,} tok/s ({pipe_s:.1f}s)  "
                f"ratio {r['ratio']:.2f}x"
            )

    ratios = [r["ratio"] for r in rounds]
    figures = {
        "corpus_bytes": size,
        "files": len(paths),
        "cpu_count": os.cpu_count(),
        "tokenize_tasks": args.tasks,
        "batch_size": args.batch_size,
        "rounds": rounds,
        "plain_tokens_per_s_median": round(statistics.median(r["plain_tokens_per_s"] for r in rounds)),
        "pipeline_tokens_per_s_median": round(statistics.median(r["pipeline_tokens_per_s"] for r in rounds)),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_cold": ratios[0],
        "ratio_warm_median": round(statistics.median(ratios[1:]), 3) if len(ratios) > 1 else None,
    }
    print(
        f"plain: {figures['plain_tokens_per_s_median']:,} tok/s   "
        f"pipeline: {figures['pipeline_tokens_per_s_median']:,} tok/s   "
        f"ratio (median of {len(rounds)} rounds): {figures['ratio_median']:.2f}x   "
        f"cold: {figures['ratio_cold']:.2f}x"
        + (f"   warm: {figures['ratio_warm_median']:.2f}x" if figures["ratio_warm_median"] else "")
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
