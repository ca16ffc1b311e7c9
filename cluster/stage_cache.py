"""The pipeline's stage cache: each cached stage records what it was computed from, and is skipped
while that record and its output are current.

The record, `<run>/stages/<stage>.json`, holds a key hashed from the config sections the stage reads
plus the key and finish time of the stage before it. A stage whose record matches and whose output
still exists is skipped, so a rerun continues where the last one stopped, and a config change re-runs
the stage that reads the changed section and every stage after it. (The records sit together in
`stages/` rather than inside each output folder because the training loop owns its stage folders and
clears them when a fresh run starts.) A training stage that was interrupted resumes from its newest
complete checkpoint instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster.config import RunConfig
from cluster.progress import StageDisplay

# Config fields that never change a stage's output: the gate only decides whether to deploy.
HASH_EXCLUDE: dict[str, set[str]] = {"eval": {"min_exact_match"}}


class PipelineError(RuntimeError):
    """A stage failed in a way the user can act on; the message says which stage and why."""



def sections_hash(cfg: RunConfig, sections: tuple[str, ...]) -> str:
    """`RunConfig.section_hash` over `sections`, minus the fields in HASH_EXCLUDE."""
    payload = {
        name: getattr(cfg, name).model_dump(mode="json", exclude=HASH_EXCLUDE.get(name)) for name in sections
    }
    if not any(HASH_EXCLUDE.get(name) for name in sections):
        return cfg.section_hash(*sections)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    stage: str
    key: str
    status: str  # "running" | "done"
    started_unix_s: float
    finished_unix_s: float | None = None
    seconds: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> StageRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))
        tmp.replace(path)


@dataclass
class Stage:
    """One cached step: what it reads, what it produces, how to run it.

    `run(cfg, resume)` returns a small JSON-able dict kept in the record (paths, counts);
    `resume` is True only for a resumable stage whose previous attempt, with the same key, stopped
    part-way.
    """

    name: str
    sections: tuple[str, ...]
    output: Callable[[RunConfig], Path]
    run: Callable[[RunConfig, bool], dict[str, Any] | None]
    train_dir: str | None = None  # training stages: folder of checkpoints under the run
    applies: Callable[[RunConfig], bool] = lambda cfg: True
    why_not: str = ""


@dataclass
class Outcome:
    stage: str
    status: str  # "ran" | "skipped" | "n/a" | "failed"
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Runs cached stages in order, skipping the ones whose record and output are current."""

    def __init__(self, cfg: RunConfig, stages: list[Stage], console: Console | None = None):
        self.cfg, self.stages = cfg, stages
        self.console = console or Console()
        self.display = StageDisplay(self.console)
        self.run_dir = Path(cfg.run_dir())
        self.layout = cfg.layout()
        self.outcomes: list[Outcome] = []

    def record_path(self, stage: Stage) -> Path:
        return self.layout.stage_record(stage.name)

    def _key(self, stage: Stage, upstream: str) -> str:
        payload = {
            "stage": stage.name,
            "config": sections_hash(self.cfg, stage.sections),
            "upstream": upstream,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _has_checkpoints(self, stage: Stage) -> bool:
        return bool(stage.train_dir) and any((self.run_dir / stage.train_dir).glob("checkpoint_*"))

    def run(self) -> list[Outcome]:
        upstream = ""
        for stage in self.stages:
            if not stage.applies(self.cfg):
                self.outcomes.append(Outcome(stage.name, "n/a", detail={"why": stage.why_not}))
                self.console.print(f"[dim]- {stage.name:<10} not needed ({stage.why_not})[/]")
                continue
            key = self._key(stage, upstream)
            path = self.record_path(stage)
            record = StageRecord.load(path)
            current = record is not None and record.key == key
            if current and record.status == "done" and stage.output(self.cfg).exists():
                self.outcomes.append(Outcome(stage.name, "skipped", record.seconds or 0.0, record.detail))
                summary = record.detail.get("summary") or str(stage.output(self.cfg))
                self.console.print(
                    f"[green]✓[/] {stage.name:<10} up to date, skipped · {summary}",
                    highlight=False,
                    soft_wrap=True,
                )
                upstream = f"{key}@{record.finished_unix_s}"
                continue
            resume = current and record.status == "running" and self._has_checkpoints(stage)
            if not resume and self._has_checkpoints(stage):
                self.console.print(
                    f"[yellow]{stage.name}: discarding checkpoints of an earlier configuration[/]"
                )
                shutil.rmtree(self.run_dir / stage.train_dir)
            record = StageRecord(stage.name, key, "running", time.time())
            record.save(path)
            started = time.perf_counter()
            try:
                with self.display.stage(stage.name, "resuming…" if resume else ""):
                    detail = stage.run(self.cfg, resume) or {}
            except BaseException:
                seconds = time.perf_counter() - started
                self.outcomes.append(Outcome(stage.name, "failed", seconds))
                self.console.print(f"[red]✗[/] {stage.name:<10} failed after {seconds:.0f} s")
                raise
            record.status, record.finished_unix_s = "done", time.time()
            record.seconds = round(time.perf_counter() - started, 1)
            record.detail = detail
            record.save(path)
            self.outcomes.append(Outcome(stage.name, "ran", record.seconds, detail))
            summary = f" · {detail['summary']}" if detail.get("summary") else ""
            verb = "resumed, done" if resume else "done"
            self.console.print(
                f"[green]✓[/] {stage.name:<10} {verb} in {record.seconds:.0f} s{summary}",
                highlight=False,
                soft_wrap=True,
            )
            upstream = f"{key}@{record.finished_unix_s}"
        return self.outcomes
