"""Training metrics: rank 0 writes JSON lines + TensorBoard events; the driver tails and summarises them.

Ray Train V2 only hands the driver metrics reported together with a checkpoint, so the full history
lives in `<run>/<stage>/metrics.jsonl`. Every record has an `event` ("start", "train", "val",
"checkpoint", "checkpoint_skipped", "end") so restarts and resumes are visible in the log itself.
The driver adds timing records around the workers' ("launch" before they start, "exported" after the
model is exported) so the summary can show cold start → first logged step and last step → export.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

# Published dense bf16 tensor-core peak per device (vendor datasheets; SXM parts), matched by substring
# of `torch.cuda.get_device_name()`, longest key first ("H100 PCIe" before "H100").
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,  # A10G (AWS) / A10: 125 TFLOP/s dense bf16
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "MI300X": 1307e12,
}


def peak_flops(device_name: str | None, fallback: float) -> float:
    """Per-device peak FLOP/s for MFU: the published bf16 peak of a known GPU, else `fallback`
    (`train.peak_flops`, which is what a CPU run or an unknown device uses)."""
    if device_name:
        for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
            if key.lower() in device_name.lower():
                return PEAK_BF16_FLOPS[key]
    return fallback


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation (PaLM appendix B): achieved training FLOP/s over the peak of all workers."""
    return tokens_per_s * flops_per_token / peak_flops_total


class NullWriter:
    """The writer of ranks other than 0: same calls, writes nothing (so the loop needs no rank guards)."""

    def log(self, event: str, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors the numeric ones into TensorBoard (rank 0 only)."""

    @classmethod
    def for_rank(cls, out_dir: str | Path, rank: int) -> MetricsWriter | NullWriter:
        """The real writer on rank 0, a no-op elsewhere: one file, written by one process."""
        return cls(out_dir) if rank == 0 else NullWriter()

    def __init__(self, out_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.dir / METRICS_FILE, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, event: str, step: int, **values: Any) -> None:
        record = {"event": event, "step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        if event in ("train", "val"):
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def log_event(out_dir: str | Path, event: str, **values: Any) -> None:
    """Append one record from the driver (no TensorBoard), e.g. `log_event(out, "exported", path=...)`
    right after exporting: the summary reads last step → export from it."""
    path = Path(out_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "step": None, "time": time.time(), **values}) + "\n")


def log_launch(out_dir: str | Path) -> None:
    """The driver's "launch" record: when this process started (the cold start of `raylm train` or a
    Ray job entrypoint) and when it handed the run to Ray Train."""
    import psutil

    log_event(out_dir, "launch", process_start=psutil.Process().create_time())


def startup_timings(records: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds from the last launch to its first logged step, and from the last step to the export.

    `cold_start_s` counts from process start (everything `raylm train` does before step 1: Ray start,
    data preparation, worker and engine start-up); `fit_to_first_step_s` from the hand-over to Ray
    Train; `step_to_export_s` from the workers' "end" record to the driver's "exported" record.
    """
    out: dict[str, float] = {}
    launches = [i for i, r in enumerate(records) if r["event"] == "launch"]
    if launches:
        launch = records[launches[-1]]
        first = next((r for r in records[launches[-1] :] if r["event"] == "train"), None)
        if first is not None:
            out["cold_start_s"] = first["time"] - launch["process_start"]
            out["fit_to_first_step_s"] = first["time"] - launch["time"]
    ends = [r for r in records if r["event"] == "end"]
    exported = [r for r in records if r["event"] == "exported"]
    if ends and exported and exported[-1]["time"] >= ends[-1]["time"]:
        out["step_to_export_s"] = exported[-1]["time"] - ends[-1]["time"]
    compiled = [r for r in records if r["event"] == "compile"]
    if compiled:
        out["compile_s"] = compiled[-1]["seconds"]
    return out


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(records: list[dict[str, Any]], png: str | Path) -> Path:
    """Train and validation loss against step (the last attempt's values win after a restart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = {r["step"]: r["loss"] for r in records if r["event"] == "train"}
    val = {r["step"]: r["val_loss"] for r in records if r["event"] == "val"}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def summary_table(records: list[dict[str, Any]], title: str):
    """A one-screen rich table of the run: steps, losses, throughput, restarts."""
    from rich.table import Table

    train = [r for r in records if r["event"] == "train"]
    val = [r for r in records if r["event"] == "val"]
    starts = [r for r in records if r["event"] == "start"]
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    if train:
        table.add_row("steps", f"{train[-1]['step']}")
        table.add_row("tokens seen", f"{train[-1]['tokens_seen']:,}")
        table.add_row("train loss first → last", f"{train[0]['loss']:.4f} → {train[-1]['loss']:.4f}")
        rates = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
        table.add_row("tokens/s (mean)", f"{sum(rates) / len(rates):,.0f}")
        table.add_row("MFU (mean)", f"{sum(r['mfu'] for r in train) / len(train):.2%}")
    if val:
        table.add_row("val loss / perplexity", f"{val[-1]['val_loss']:.4f} / {val[-1]['val_ppl']:.2f}")
    if starts:
        table.add_row("starts (resumed from step)", ", ".join(str(r["step"]) for r in starts))
        nodes = len(set(starts[-1].get("node_ids", [])))
        table.add_row("workers", f"{starts[-1].get('world_size')} on {nodes} node(s)")
    timings = startup_timings(records)
    labels = {
        "cold_start_s": "cold start → first logged step",
        "fit_to_first_step_s": "  of which Ray Train start → first step",
        "compile_s": "torch.compile (first step)",
        "step_to_export_s": "last step → exported model",
    }
    for key, label in labels.items():
        if key in timings:
            table.add_row(label, f"{timings[key]:.1f} s")
    return table


class ProgressTail(threading.Thread):
    """Driver-side live progress: follows metrics.jsonl written by rank 0 while `fit()` runs."""

    def __init__(self, out_dir: str | Path, total_steps: int, description: str = "training"):
        super().__init__(daemon=True)
        self.path = Path(out_dir) / METRICS_FILE
        self.total = total_steps
        self.description = description
        self._stop_event = threading.Event()

    def run(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        offset = self.path.stat().st_size if self.path.exists() else 0
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"))
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(self.description, total=self.total, info="starting workers…")
            while not self._stop_event.wait(0.5):
                if not self.path.exists():
                    continue
                with open(self.path, encoding="utf-8") as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                offset += len(complete.encode("utf-8"))
                for line in complete.splitlines():
                    r = json.loads(line)
                    if r["event"] == "train":
                        info = f"loss {r['loss']:.3f}  {r['tokens_per_s']:,.0f} tok/s  MFU {r['mfu']:.1%}"
                        progress.update(task, completed=r["step"], info=info)
                    elif r["event"] == "start":
                        progress.update(task, completed=r["step"], info=f"(re)started at step {r['step']}")
                    elif r["event"] == "elastic_resume":
                        old, new, took = r["from_world_size"], r["to_world_size"], r["conversion_s"]
                        progress.console.print(
                            f"resumed a {old}-worker checkpoint on {new} worker(s) through a universal "
                            f"checkpoint (converted in {took:.1f} s)"
                        )

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
