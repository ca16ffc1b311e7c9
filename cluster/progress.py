"""raylm's own progress on the terminal: one live line per running stage, one summary line when it ends.

A stage reports through `current_line()` (a context variable, so stage functions keep their
`(cfg, resume)` signature and a stage run outside the pipeline reports to nobody). Training stages are
followed from the outside: rank 0 appends a record to `<run>/<stage>/metrics.jsonl` every
`log_every` steps and `follow_metrics` tails that file, so the display needs nothing from the workers.

On a terminal the live lines redraw in place (rich, transient); when the output is a file or a pipe
nothing redraws, so a line is printed at most every `heartbeat_s` instead, which keeps a CI log
readable and short.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from jobs.metrics import METRICS_FILE


class _BarWhenCounted(BarColumn):
    """A bar only for lines that count steps; the others show just their text."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.total is not None else Text("")


class _StepsWhenCounted(MofNCompleteColumn):
    def render(self, task: Task) -> Text:
        return super().render(task) if task.total is not None else Text("")


class StageLine:
    """The live line of one running stage."""

    def __init__(self, display: StageDisplay | None, name: str, task_id: Any = None):
        self.display, self.name, self.task_id = display, name, task_id
        self._last_heartbeat = time.monotonic()

    def update(self, info: str, completed: int | None = None, total: int | None = None) -> None:
        if self.display is None:
            return
        fields: dict[str, Any] = {"info": info}
        if total is not None:
            fields["total"] = total
        if completed is not None:
            fields["completed"] = completed
        self.display.progress.update(self.task_id, **fields)
        self.display.heartbeat(self, info, completed, total)


_current: contextvars.ContextVar[StageLine] = contextvars.ContextVar("raylm_stage_line")


def current_line() -> StageLine:
    """The line of the stage running in this context, or a line that shows nothing."""
    return _current.get(StageLine(None, ""))


class StageDisplay:
    """Live stage lines on `console` (never redirecting stdout/stderr: library output stays where it
    was sent), and the permanent lines printed above them."""

    def __init__(self, console: Console, heartbeat_s: float = 30.0):
        self.console = console
        self.heartbeat_s = heartbeat_s
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description:<10}"),
            _BarWhenCounted(bar_width=24),
            _StepsWhenCounted(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def __enter__(self) -> StageDisplay:
        if self.console.is_terminal:  # off a terminal nothing redraws: only heartbeats are printed
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)

    @contextmanager
    def stage(self, name: str, info: str = "") -> Iterator[StageLine]:
        """A live line for the block; the stage's code finds it with `current_line()`."""
        task_id = self.progress.add_task(name, total=None, info=info)
        line = StageLine(self, name, task_id)
        token = _current.set(line)
        try:
            yield line
        finally:
            _current.reset(token)
            self.progress.remove_task(task_id)
            if self.progress.live.is_started:
                self.progress.refresh()  # so the finished line is not redrawn under its summary

    def heartbeat(self, line: StageLine, info: str, completed: int | None, total: int | None) -> None:
        """Off a terminal, print a stage's progress now and then (nothing redraws in a file)."""
        if self.console.is_terminal or time.monotonic() - line._last_heartbeat < self.heartbeat_s:
            return
        line._last_heartbeat = time.monotonic()
        steps = f"{completed}/{total} · " if completed is not None and total else ""
        self.console.print(f"  {line.name}: {steps}{info}", highlight=False)


# ---- training: follow rank 0's metrics.jsonl ----------------------------------------------------------
def format_duration(seconds: float) -> str:
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class TrainingRate:
    """ETA from the wall time between the first and the latest train record of this attempt."""

    total: int
    first_step: int | None = None
    first_time: float = 0.0

    def eta(self, step: int, now: float) -> float | None:
        if self.first_step is None:
            self.first_step, self.first_time = step, now
            return None
        if step <= self.first_step:
            return None
        per_step = (now - self.first_time) / (step - self.first_step)
        return per_step * (self.total - step)


def training_info(record: dict[str, Any], eta_s: float | None) -> str:
    eta = f" · ETA {format_duration(eta_s)}" if eta_s is not None else ""
    return f"loss {record['loss']:.3f} · {record['tokens_per_s']:,.0f} tok/s{eta}"


class MetricsFollower(threading.Thread):
    """Tails `<stage dir>/metrics.jsonl` and shows step/max_steps, loss, tokens/s and ETA on a line.

    The training loop clears its folder when a fresh run starts, so a file that shrinks is read again
    from its start; a resumed run appends, so the follower starts at the size the file had.
    """

    def __init__(self, stage_dir: Path, max_steps: int, line: StageLine, poll_s: float = 0.5):
        super().__init__(daemon=True, name=f"follow-{stage_dir.name}")
        self.path = Path(stage_dir) / METRICS_FILE
        self.max_steps, self.line, self.poll_s = max_steps, line, poll_s
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.rate = TrainingRate(max_steps)
        self._stop_event = threading.Event()

    def read_new(self) -> list[dict[str, Any]]:
        """Complete records appended since the last call."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:
            self.offset = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]

    def show(self, record: dict[str, Any]) -> None:
        if record["event"] == "train":
            eta = self.rate.eta(record["step"], record.get("time", time.time()))
            self.line.update(training_info(record, eta), completed=record["step"], total=self.max_steps)
        elif record["event"] == "start":
            self.rate = TrainingRate(self.max_steps, record["step"], record.get("time", time.time()))
            verb = "resumed at step" if record["step"] else "workers started, step"
            self.line.update(f"{verb} {record['step']}", completed=record["step"], total=self.max_steps)

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            for record in self.read_new():
                self.show(record)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@contextmanager
def follow_metrics(stage_dir: Path, max_steps: int) -> Iterator[None]:
    """Show a training stage's progress on the current stage line while the block runs."""
    line = current_line()
    line.update("starting workers…", completed=0, total=max_steps)
    follower = MetricsFollower(stage_dir, max_steps, line)
    follower.start()
    try:
        yield
    finally:
        follower.stop()


def training_summary(stage_dir: Path) -> str:
    """One line for a finished training stage: steps, loss first → last, mean tokens/s, validation."""
    from jobs.metrics import read_metrics

    records = read_metrics(stage_dir)
    train = [r for r in records if r["event"] == "train"]
    if not train:
        return ""
    rates = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
    text = (
        f"{train[-1]['step']} steps · loss {train[0]['loss']:.2f} → {train[-1]['loss']:.2f} · "
        f"{sum(rates) / len(rates):,.0f} tok/s"
    )
    val = [r for r in records if r["event"] == "val"]
    return text + (f" · val loss {val[-1]['val_loss']:.2f}" if val else "")
