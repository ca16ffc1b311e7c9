"""Tokenisation throughput: the Ray Data pipeline versus plain `tokenizers` in one process, the
pipeline's serial ceiling, and where its CPU time goes.

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

Serial ceiling: what is left of the token path outside the parallel range tasks is the dedup
partitions (each sees the documents of its share of the hash space, one call per range) and the stats
ledger (one call per range). Each is measured alone, fed as fast as Ray delivers calls of the size the
range tasks send it, and turned into the tokens/s it keeps up with; divided by one core's serial
tokenise rate, that is the number of cores it can feed. The smallest of these is the serial ceiling,
the number of cores the design can feed before one process becomes the bottleneck (target >= 100).
Memory: the largest dedup partition's table, resident and peak resident memory after the run.

CPU shares: the CPU seconds of every process of the embedded Ray (and the driver) during the last
pipeline round, by role (titles sampled while it runs), as a share of the total.
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
import threading
import time
from collections import Counter, defaultdict
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


def one_core_rate(paths: list[Path], tokenizer_json: Path, batch_docs: int, max_docs: int = 20_000) -> float:
    """Tokens/s of `encode_batch_fast` on the calling thread only (what one range task does)."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
        docs = [d.strip() for p in paths for d in re.split(r"\n\s*\n", p.read_text("utf-8")) if d.strip()]
        docs = docs[:max_docs]
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(docs), batch_docs):
            tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs[i : i + batch_docs]))
        return tokens / (time.perf_counter() - start)
    finally:
        del os.environ["TOKENIZERS_PARALLELISM"]


class CpuMonitor:
    """CPU seconds per process of this driver and its descendants (the embedded Ray) over a block,
    with each process's role from its title (Ray names workers `ray::<task or actor>`).

    Sampling runs in the driver and costs about 1% of a 2-core machine at 4 Hz (psutil walks every
    process of the host to find the descendants), which the driver's row would otherwise show and
    the timed round would pay for: it samples at 2 Hz, and the driver's row leaves out the CPU of
    the sampling thread itself (`own_cpu_s`). A range task lasts over a second, so titles seen at
    2 Hz still name every worker's role.
    """

    INTERVAL_S = 0.5

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.start_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.titles: dict[int, Counter] = defaultdict(Counter)
        self.stop = threading.Event()
        self.own_cpu_s = 0.0

    def _procs(self):
        return [self.me, *self.me.children(recursive=True)]

    def _sample(self) -> None:
        for p in self._procs():
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self.last_cpu[p.pid] = t.user + t.system
                    title = " ".join(p.cmdline()[:1]) if p.pid != self.me.pid else "driver"
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
            self.titles[p.pid][_role(title)] += 1

    def __enter__(self) -> CpuMonitor:
        self._sample()
        self.start_cpu = dict(self.last_cpu)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        start = time.thread_time()
        while not self.stop.wait(self.INTERVAL_S):
            self._sample()
        self.own_cpu_s = time.thread_time() - start

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    def shares(self) -> list[dict]:
        """One row per process that used CPU: pid, role, CPU seconds, share of the total."""
        used = {pid: cpu - self.start_cpu.get(pid, 0.0) for pid, cpu in self.last_cpu.items()}
        used[self.me.pid] -= self.own_cpu_s
        total = sum(v for v in used.values() if v > 0) or 1.0
        rows = []
        for pid, cpu in sorted(used.items(), key=lambda kv: -kv[1]):
            if cpu <= 0.005:
                continue
            roles = self.titles[pid]
            busy = [r for r in roles if r != "idle worker"]
            role = max(busy, key=roles.__getitem__) if busy else "idle worker"
            rows.append({"pid": pid, "role": role, "cpu_s": round(cpu, 2), "share": round(cpu / total, 3)})
        return rows


def _role(title: str) -> str:
    if title == "driver":
        return "driver"
    if title.startswith("ray::"):
        name = title.removeprefix("ray::")
        if name == "IDLE":
            return "idle worker"
        if "pack_ranges" in name:
            return "range task (read→pack)"
        return name.split(".")[0]
    for known in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor"):
        if known in title:
            return known
    return os.path.basename(title.split(" ")[0]) or "other"


def parallelism(tasks: int) -> str:
    """How each side spreads over the cores (both use every core of the machine).

    Plain: one process, `encode_batch_fast` on the Rust Rayon pool, RAYON_NUM_THREADS threads
    (default: one per core). Pipeline: `--tasks` range tasks at once (default 0: as many as the
    cluster's CPUs, which is what a user's run gets), each encoding on its own thread
    (TOKENIZERS_PARALLELISM=false inside the task, see `packing._serial_tokenizers`). The embedded
    cluster advertises twice the cores as CPUs, so by default two tasks share a core: measured on 2
    cores, 4 tasks hide each task's read and hand-over gaps (warm 0.79/0.84x) where one task per
    core leaves them idle (0.71/0.65x).
    """
    import ray

    threads = os.environ.get("RAYON_NUM_THREADS") or f"unset = {os.cpu_count()} cores"
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return (
        f"parallelism: plain = 1 process x Rayon threads (RAYON_NUM_THREADS {threads}, "
        f"TOKENIZERS_PARALLELISM {os.environ.get('TOKENIZERS_PARALLELISM', 'unset = true')}); "
        f"pipeline = {tasks or cpus} range tasks x 1 thread (TOKENIZERS_PARALLELISM=false in each; "
        f"the cluster has {cpus} CPUs)"
    )


def bench_config(corpus: Path, tasks: int, batch_size: int):
    from data_pipelines.config import DataConfig

    return DataConfig(
        paths=[str(corpus)],
        seq_len=1024,
        val_fraction=0.0,
        tokenize_tasks=tasks,
        tokenize_batch_size=batch_size,
    )


def pipeline(
    corpus: Path, tokenizer_dir: Path, run_dir: Path, tasks: int, batch_size: int
) -> tuple[int, float, object]:
    from ray.data import DataContext

    from data_pipelines.config import TokenizerConfig
    from data_pipelines.pipeline import token_datasets

    DataContext.get_current().enable_progress_bars = False
    data = bench_config(corpus, tasks, batch_size)
    start = time.perf_counter()
    td = token_datasets(data, TokenizerConfig(path=str(tokenizer_dir)), str(run_dir))
    for _ in td.train.iter_batches(batch_size=None):
        pass
    elapsed = time.perf_counter() - start
    return td.stats().tokens, elapsed, td


def serial_parts(
    docs_per_range: float, tokens_per_doc: float, partitions: int, ranges: int = 200, repeats: int = 3
) -> dict:
    """Tokens/s one dedup partition and the ledger each keep up with, measured alone, with the
    calls a range task makes to them (a partition gets 1/P of a range's hashes)."""
    import numpy as np
    import ray

    from data_pipelines.dedup import DedupPartition
    from data_pipelines.stats import CorpusStats, new_ledger

    per_call = max(1, round(docs_per_range / partitions))
    rng = np.random.default_rng(0)
    doc_index = np.arange(per_call, dtype=np.uint32)
    calls = [
        (i, rng.integers(-(1 << 63), (1 << 63) - 1, per_call, dtype=np.int64), doc_index)
        for i in range(ranges)
    ]
    rates = []
    for _ in range(repeats):  # a fresh partition each time; the median, as machines drift
        actor = DedupPartition.remote(ranges)  # told the plan's range count, as the pipeline's are
        ray.get(actor.memory.remote())  # started
        start = time.perf_counter()
        ray.get([actor.first_occurrences.remote(i, h, p) for i, h, p in calls])
        rates.append(ranges * per_call / (time.perf_counter() - start))
        ray.kill(actor)
    dedup_docs_s = statistics.median(rates)

    ledger = new_ledger()
    counts = CorpusStats(documents_read=1, dropped={"duplicate": 1, "too_short": 2}).to_dict()
    ray.get(ledger.stats.remote())
    start = time.perf_counter()
    ray.get([ledger.add.remote("train", i, counts) for i in range(ranges)])
    ledger_ranges_s = ranges / (time.perf_counter() - start)
    ray.kill(ledger)
    return {
        "dedup_partition_docs_per_s": round(dedup_docs_s),
        "dedup_partition_tokens_per_s": round(dedup_docs_s * tokens_per_doc),
        "ledger_ranges_per_s": round(ledger_ranges_s, 1),
        "ledger_tokens_per_s": round(ledger_ranges_s * docs_per_range * tokens_per_doc),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    parser.add_argument("--files", type=int, default=16, help="number of corpus files")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/pipeline rounds")
    parser.add_argument(
        "--tasks",
        type=int,
        default=0,
        help="concurrent range tasks (default 0: the cluster's CPUs, as a user's run; the embedded "
        "cluster sets them to twice the cores)",
    )
    parser.add_argument("--batch-size", type=int, default=2048, help="documents per batch (both sides)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    from cluster.config import ClusterConfig
    from cluster.local_ray import ensure_ray
    from data_pipelines.config import TokenizerConfig
    from data_pipelines.dedup import PEAK_ENTRY_BYTES
    from data_pipelines.pipeline import CPUS_PER_DEDUP_PARTITION
    from data_pipelines.readers import list_inputs, plan_reads
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
        print(parallelism(args.tasks))
        for i in range(1, args.rounds + 1):
            td = None  # the round before has ended, as a user's run that starts a new one has
            plain_tokens, plain_s = plain(paths, tok_dir / "tokenizer.json", args.batch_size)
            with CpuMonitor() as monitor:
                pipe_tokens, pipe_s, td = pipeline(
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
        cpu = monitor.shares()  # of the last pipeline round
        stats, partitions = td.stats(), td.dedup.memory()
        cfg = bench_config(root / "corpus", args.tasks, args.batch_size)
        ranges = len(plan_reads(list_inputs(cfg.paths), cfg))
        core_rate = one_core_rate(paths, tok_dir / "tokenizer.json", args.batch_size)
        tokens_per_doc = stats.tokens / max(1, stats.documents_kept)
        parts = serial_parts(stats.documents_read / ranges, tokens_per_doc, len(partitions))

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
        "read_ranges": ranges,
        "documents_kept": stats.documents_kept,
        "one_core_tokens_per_s": round(core_rate),
        "serial_parts": parts,
        "dedup_partition_cores": round(parts["dedup_partition_tokens_per_s"] / core_rate, 1),
        "ledger_cores": round(parts["ledger_tokens_per_s"] / core_rate, 1),
        "cpus_per_dedup_partition": CPUS_PER_DEDUP_PARTITION,
        "serial_ceiling_cores": round(
            min(parts["dedup_partition_tokens_per_s"], parts["ledger_tokens_per_s"]) / core_rate, 1
        ),
        "dedup_partitions": partitions,
        "dedup_peak_entry_bytes": PEAK_ENTRY_BYTES,
        "cpu_shares_last_round": cpu,
    }
    print(
        f"plain: {figures['plain_tokens_per_s_median']:,} tok/s   "
        f"pipeline: {figures['pipeline_tokens_per_s_median']:,} tok/s   "
        f"ratio (median of {len(rounds)} rounds): {figures['ratio_median']:.2f}x   "
        f"cold: {figures['ratio_cold']:.2f}x"
        + (f"   warm: {figures['ratio_warm_median']:.2f}x" if figures["ratio_warm_median"] else "")
    )
    report_serial_and_cpu(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def report_serial_and_cpu(f: dict) -> None:
    parts, core = f["serial_parts"], f["one_core_tokens_per_s"]
    print(f"\none core tokenises {core:,} tok/s; {f['read_ranges']} read ranges")
    print("serial / per-partition processes, each measured alone (cores = its tok/s / one core's):")
    rows = [
        ("one dedup partition", f"{parts['dedup_partition_docs_per_s']:,} docs/s",
         parts["dedup_partition_tokens_per_s"], f["dedup_partition_cores"]),
        ("stats ledger", f"{parts['ledger_ranges_per_s']:,} ranges/s",
         parts["ledger_tokens_per_s"], f["ledger_cores"]),
    ]
    for name, calls, tokens, cores in rows:
        verdict = "ok" if cores >= 100 else "BELOW 100"
        print(f"  {name:<20} {calls:>18}  {tokens:>15,} tok/s  {cores:>8,} cores  {verdict}")
    print(
        f"serial ceiling (the smallest): {f['serial_ceiling_cores']:,} cores before one process is the "
        f"bottleneck; each partition is sized for {f['cpus_per_dedup_partition']} CPUs, this run used "
        f"{len(f['dedup_partitions'])} partition(s)"
    )
    largest = max(f["dedup_partitions"], key=lambda p: p["peak_rss_bytes"])
    print(
        f"largest dedup partition: {largest['entries']:,} hashes, table {largest['table_bytes'] / 2**20:.1f} "
        f"MiB, RSS {largest['rss_bytes'] / 2**20:.0f} MiB, peak RSS {largest['peak_rss_bytes'] / 2**20:.0f} "
        "MiB; larger corpora: table 32-64 B x documents / partitions (sized once from the plan; "
        f"<= {f['dedup_peak_entry_bytes']} B x unique documents / partitions while one doubles) "
        "+ the worker's base RSS"
    )
    print("\nCPU of the last pipeline round by process (share of all CPU seconds):")
    by_role: dict[str, list[float]] = defaultdict(list)
    for row in f["cpu_shares_last_round"]:
        by_role[row["role"]].append(row["share"])
    for role, shares in sorted(by_role.items(), key=lambda kv: -sum(kv[1])):
        print(
            f"  {role:<28} {len(shares):>3} process(es)  total {sum(shares):6.1%}  "
            f"largest single process {max(shares):6.1%}"
        )


if __name__ == "__main__":
    main()
