"""The stage vocabulary and the layout of a run folder: one place that names every path under a run.

It lives in the lowest layer (`data_pipelines`) because the data stages already write under the run
folder (the demo corpus, the tokenizer, the token shards); `jobs` and `cluster` import it from here,
so no layer has to import a higher one to find a file another stage wrote.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path


class Stage(enum.StrEnum):
    """Every stage of a run, in pipeline order; the value is the name users see and folders carry."""

    DATA = "data"  # resolve the corpus (or write the demo corpus)
    TOKENIZER = "tokenizer"
    TOKENS = "tokens"  # tokenize + pack into Parquet shards
    PRETRAIN = "pretrain"
    FINETUNE = "finetune"
    EVAL = "eval"
    EXPORT = "export"


# The stages one command runs on its own (`raylm submit STAGE`, `python -m cluster.run_stage STAGE`,
# a RayJob): data, tokenizer and tokens are one command (the token shards need the other two).
RUNNABLE_STAGES: tuple[Stage, ...] = (Stage.TOKENS, Stage.PRETRAIN, Stage.FINETUNE, Stage.EVAL, Stage.EXPORT)

# Names the CLI has always accepted for a runnable stage (`raylm submit train`, `--stage data`).
STAGE_ALIASES: dict[str, Stage] = {"train": Stage.PRETRAIN, "data": Stage.TOKENS}

# Every name a command accepts for a runnable stage, in the order help texts list them.
STAGE_NAMES: tuple[str, ...] = tuple(map(str, (*RUNNABLE_STAGES, *STAGE_ALIASES)))

# The exported Hugging Face folders, in the order serving prefers them.
EXPORT_NAMES: tuple[str, ...] = ("finetuned", "pretrained")


def runnable_stage(name: str) -> Stage:
    """The runnable stage `name` (or one of its aliases) names; ValueError lists what is allowed."""
    stage = STAGE_ALIASES.get(name) or {s.value: s for s in Stage}.get(name)
    if stage not in RUNNABLE_STAGES:
        allowed = ", ".join(STAGE_NAMES)
        raise ValueError(f"unknown stage {name!r}; allowed stages: {allowed}")
    return stage


@dataclass(frozen=True)
class RunLayout:
    """The files of one run under `root` (`<storage_path>/<run_name>`, local or a URI for checkpoints).

    Every stage finds what another wrote through these properties instead of joining literals.
    """

    root: Path

    def stage_dir(self, stage: Stage | str) -> Path:
        """A training stage's folder: checkpoints, metrics.jsonl, TensorBoard events, loss_curve.png."""
        return self.root / str(stage)

    def export(self, name: str) -> Path:
        """An exported Hugging Face folder: `pretrained` or `finetuned`."""
        return self.root / "export" / name

    @property
    def exports_root(self) -> Path:
        return self.root / "export"

    @property
    def pretrained(self) -> Path:
        return self.export("pretrained")

    @property
    def finetuned(self) -> Path:
        return self.export("finetuned")

    @property
    def demo_corpus(self) -> Path:
        return self.root / "data" / "demo"

    @property
    def inputs_record(self) -> Path:
        """What the data stage resolved (files, bytes, demo or not), for the report."""
        return self.root / "data" / "inputs.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def stage_records(self) -> Path:
        """The pipeline's record of each finished stage (`<stage>.json`: key, finish time, outputs)."""
        return self.root / "stages"

    def stage_record(self, stage: Stage | str) -> Path:
        return self.stage_records / f"{stage}.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_results(self) -> Path:
        return self.eval_dir / "results.json"

    @property
    def serve_key(self) -> Path:
        """The API key the pipeline generated for its endpoint (mode 0600)."""
        return self.root / "serve" / "api_key"

    def memory_estimate(self, stage: Stage | str) -> Path:
        """The preflight's memory estimate of a training stage, beside (not in) the stage folder that a
        fresh run clears, so the end-of-run summary can still read it."""
        return self.root / "preflight" / f"memory_{stage}.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def log_file(self, command: str) -> Path:
        """Where a command's library output goes (one file per invocation)."""
        return self.root / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
