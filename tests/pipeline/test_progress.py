"""raylm's terminal: library output goes to the run's log file, raylm's own lines to the terminal, and
training progress is followed from rank 0's metrics.jsonl.

These run without Ray: the log routing is checked at the file-descriptor level with a real child
process (a Ray worker's output reaches the driver the same way), the follower against a metrics file
written as the training loop writes it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from cluster.logs import log_file_for, set_verbose, verbose
from cluster.progress import MetricsFollower, StageDisplay, TrainingRate, format_duration, training_summary

CHILD = """
import subprocess, sys, warnings
from pathlib import Path
from rich.console import Console
from cluster.logs import library_output_to

ours, our_err = Console(), Console(stderr=True)
with library_output_to(Path(sys.argv[1]), ours, stderr_consoles=(our_err,)):
    ours.print("raylm: pretrain done")
    our_err.print("raylm: error shown to the user")
    print("library print")
    warnings.warn("library FutureWarning", FutureWarning)
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('worker stderr')"], check=True)
    raise RuntimeError("the worker failed")
"""


def test_library_output_goes_to_the_log_and_raylm_output_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "pipeline.log"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, timeout=120
    )
    assert "raylm: pretrain done" in child.stdout
    assert "raylm: error shown to the user" in child.stderr
    for library_line in ("library print", "library FutureWarning", "worker stderr"):
        assert library_line not in child.stdout + child.stderr
        assert library_line in log.read_text()
    # The exception leaves the block with the terminal restored: its traceback reaches the user.
    assert child.returncode == 1 and "RuntimeError: the worker failed" in child.stderr


def test_verbose_switch(monkeypatch):
    monkeypatch.delenv("RAYLM_VERBOSE", raising=False)
    assert not verbose() and not set_verbose(False)
    monkeypatch.setenv("RAYLM_VERBOSE", "0")
    assert not verbose()
    assert set_verbose(True) and verbose()


def test_log_file_lives_under_the_run_folder(tmp_path):
    path = log_file_for(str(tmp_path / "demo"), "pipeline")
    assert path.parent == tmp_path / "demo" / "logs" and path.name.startswith("pipeline-")


def record(event: str, step: int, t: float, **values) -> str:
    return json.dumps({"event": event, "step": step, "time": t, **values}) + "\n"


def train_record(step: int, t: float, loss: float) -> str:
    return record("train", step, t, loss=loss, tokens_per_s=2000.0, mfu=0.01, tokens_seen=step * 100)


class Lines:
    """A stand-in for the display's line that remembers what it was told (the display itself is
    checked below with a real console)."""

    def __init__(self):
        self.updates: list[tuple[str, int | None, int | None]] = []

    def update(self, info: str, completed: int | None = None, total: int | None = None) -> None:
        self.updates.append((info, completed, total))


def test_follower_shows_step_loss_rate_and_eta(tmp_path):
    stage = tmp_path / "pretrain"
    stage.mkdir()
    line = Lines()
    follower = MetricsFollower(stage, 100, line)
    metrics = stage / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write(record("start", 0, 1000.0))
        f.write(train_record(20, 1010.0, 5.0))
        f.write(train_record(40, 1020.0, 4.0)[:-10])  # a half-written line is left for later
    for r in follower.read_new():
        follower.show(r)
    assert line.updates[-1] == ("loss 5.000 · 2,000 tok/s · ETA 0:40", 20, 100)
    with metrics.open("a") as f:
        f.write(train_record(40, 1020.0, 4.0)[-10:])
    for r in follower.read_new():
        follower.show(r)
    assert line.updates[-1] == ("loss 4.000 · 2,000 tok/s · ETA 0:30", 40, 100)


def test_follower_rereads_a_file_that_a_fresh_run_replaced(tmp_path):
    stage = tmp_path / "finetune"
    stage.mkdir()
    (stage / "metrics.jsonl").write_text(record("start", 0, 1.0) + train_record(10, 2.0, 9.0) * 5)
    follower = MetricsFollower(stage, 50, Lines())  # starts after what is already there (a resume)
    assert follower.read_new() == []
    (stage / "metrics.jsonl").write_text(record("start", 0, 5.0))  # the loop cleared its folder
    assert [r["event"] for r in follower.read_new()] == ["start"]


def test_follower_thread_updates_a_live_display(tmp_path):
    stage = tmp_path / "pretrain"
    stage.mkdir()
    out = io.StringIO()
    display = StageDisplay(Console(file=out, width=120), heartbeat_s=0)
    with display, display.stage("pretrain") as line:
        follower = MetricsFollower(stage, 30, line, poll_s=0.05)
        follower.start()
        (stage / "metrics.jsonl").write_text(record("start", 0, 0.0) + train_record(10, 5.0, 3.25))
        deadline = time.monotonic() + 30
        while "loss 3.250" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        follower.stop()
    # Off a terminal the line is printed as a heartbeat instead of redrawn.
    assert "pretrain: 10/30 · loss 3.250 · 2,000 tok/s · ETA 0:10" in out.getvalue()


def test_eta_and_durations():
    rate = TrainingRate(total=150)
    assert rate.eta(0, 100.0) is None
    assert rate.eta(50, 150.0) == pytest.approx(100.0)
    assert format_duration(59.6) == "1:00" and format_duration(3725) == "1:02:05"


def test_training_summary_reads_the_metrics(tmp_path):
    stage = tmp_path / "pretrain"
    stage.mkdir()
    lines = [record("start", 0, 0.0), train_record(10, 1.0, 6.0), train_record(20, 2.0, 2.5)]
    lines.append(record("val", 20, 2.0, val_loss=2.75, val_ppl=15.6))
    (stage / "metrics.jsonl").write_text("".join(lines))
    assert training_summary(stage) == "20 steps · loss 6.00 → 2.50 · 2,000 tok/s · val loss 2.75"
    assert training_summary(Path(tmp_path / "missing")) == ""
