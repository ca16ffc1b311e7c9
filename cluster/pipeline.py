"""`raylm pipeline run.yaml`: corpus → tokenizer → token shards → pretrain → fine-tune → evaluate → export →
deploy on Ray Serve → smoke requests through the `openai` client, in one run folder.

Read `default_stages` for the cached stages (each skipped while current, see `cluster/stage_cache.py`)
and `run_pipeline` for the rest of the run. Between evaluation and deploy sits the gate: with
`eval.min_exact_match` set, a model that scores below it is not deployed and the command exits
non-zero. Every run ends by writing `report.md`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster.config import RunConfig
from cluster.deploy import Endpoint, deploy, deploy_model, smoke_questions, smoke_requests, verify_export
from cluster.progress import current_line, follow_metrics, training_summary
from cluster.stage_cache import Outcome, Pipeline, PipelineError, Stage
from data_pipelines import layout

EXIT_GATE = 3


class GateError(PipelineError):
    """The evaluation gate stopped the deploy."""


# ---- the stages --------------------------------------------------------------------------------------
def _data_stage(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from data_pipelines.pipeline import resolve_corpus

    data, files = resolve_corpus(cfg.data, cfg.run_dir())
    summary = {
        "inputs": [f.uri for f in files][:20],
        "num_inputs": len(files),
        "bytes": sum(f.size for f in files),
        "demo": not cfg.data.paths,
    }
    out = cfg.layout().inputs_record
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    source = "built-in demo corpus" if summary["demo"] else f"{len(files)} file(s)"
    return summary | {"summary": f"{source}, {summary['bytes']:,} bytes"}


def _tokenizer_stage(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from data_pipelines.pipeline import ensure_tokenizer, resolve_corpus
    from data_pipelines.tokenizer import load_tokenizer

    data, files = resolve_corpus(cfg.data, cfg.run_dir())
    current_line().update(f"training a {cfg.tokenizer.vocab_size:,}-token {cfg.tokenizer.kind} tokenizer")
    path = ensure_tokenizer(data, cfg.tokenizer, cfg.run_dir(), files)
    vocab = len(load_tokenizer(path))
    return {"path": str(path), "vocab_size": vocab, "summary": f"{cfg.tokenizer.kind}, {vocab:,} tokens"}


def _shards_manifest(cfg: RunConfig) -> Path:
    from data_pipelines.pipeline import shards_dir_of

    return Path(shards_dir_of(cfg.data, cfg.run_dir())) / "manifest.json"


def _tokens_stage(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from data_pipelines.pipeline import prepare
    from data_pipelines.stats import CorpusStats

    line, seq_len = current_line(), cfg.data.seq_len
    line.update("reading, cleaning and tokenizing the corpus")

    def on_blocks(split: str, blocks: int) -> None:
        line.update(f"{split}: {blocks:,} blocks · {blocks * seq_len:,} tokens")

    manifest = prepare(cfg.data, cfg.tokenizer, cfg.run_dir(), on_blocks=on_blocks)
    stats = CorpusStats.from_dict(manifest["stats"])
    dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.dropped.items()) if v) or "none"
    summary = (
        f"{stats.documents_kept:,}/{stats.documents_read:,} documents kept (dropped: {dropped}) · "
        f"{stats.tokens:,} tokens in {stats.blocks:,} blocks of {seq_len}"
    )
    return {"manifest": str(_shards_manifest(cfg)), "splits": manifest["splits"], "summary": summary}


def _pretrain_stage(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.pretrain import run

    stage_dir = cfg.layout().stage_dir(layout.Stage.PRETRAIN)
    with follow_metrics(stage_dir, cfg.train.max_steps):
        result = run(cfg, resume=resume)
    summary = _with_estimate(training_summary(stage_dir), cfg, "pretrain")
    return {"export": str(result.export_dir), "checkpoint": str(result.checkpoint), "summary": summary}


def _finetune_stage(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.finetune import run

    stage_dir = cfg.layout().stage_dir(layout.Stage.FINETUNE)
    with follow_metrics(stage_dir, cfg.finetune.max_steps):
        export = run(cfg, resume=resume)
    return {"export": str(export), "summary": _with_estimate(training_summary(stage_dir), cfg, "finetune")}


def _with_estimate(summary: str, cfg: RunConfig, stage: str) -> str:
    """A training stage's summary line, with the memory its preflight estimated per worker."""
    from cluster.preflight import read_estimate

    est = read_estimate(cfg, stage)
    return f"{summary} · {est.short()}" if est else summary


def _eval_stage(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.evaluate import run

    current_line().update(f"answering up to {cfg.eval.max_examples} held-out questions per model")
    results = run(cfg)
    scores = {
        name: {k: r[k] for k in ("exact_match", "token_f1") if k in r}
        for name, r in results["models"].items()
    }
    summary = " · ".join(
        f"{name} exact match {s.get('exact_match', 0):.2f}, F1 {s.get('token_f1', 0):.2f}"
        for name, s in scores.items()
    )
    return scores | {"summary": summary}


def default_stages() -> list[Stage]:
    """The pipeline's cached stages, in order, with the config sections each one reads."""
    S = layout.Stage
    return [
        Stage(S.DATA, ("data",), lambda c: c.layout().inputs_record, _data_stage),
        Stage(
            S.TOKENIZER, ("tokenizer",), lambda c: c.layout().tokenizer / "tokenizer.json", _tokenizer_stage
        ),
        Stage(
            S.TOKENS,
            (),
            _shards_manifest,
            _tokens_stage,
            applies=lambda c: c.data.mode == "materialize",
            why_not="data.mode is stream: pretraining tokenizes",
        ),
        Stage(
            S.PRETRAIN,
            ("model", "train"),
            lambda c: c.layout().pretrained / "config.json",
            _pretrain_stage,
            train_dir=S.PRETRAIN,
        ),
        Stage(
            S.FINETUNE,
            ("finetune",),
            lambda c: c.layout().finetuned / "config.json",
            _finetune_stage,
            train_dir=S.FINETUNE,
        ),
        Stage(S.EVAL, ("eval",), lambda c: c.layout().eval_results, _eval_stage),
    ]


# ---- the gate ----------------------------------------------------------------------------------------
def check_gate(cfg: RunConfig, model_name: str) -> str:
    """Raise GateError when the deployed model's exact match is below `eval.min_exact_match`."""
    threshold = cfg.eval.min_exact_match
    if threshold is None:
        return "no gate (eval.min_exact_match unset)"
    results_file = cfg.layout().eval_results
    results = json.loads(results_file.read_text())["models"]
    if model_name not in results:
        raise GateError(f"evaluation gate: no evaluation of the {model_name} model in {results_file}")
    em = results[model_name]["exact_match"]
    if not em >= threshold:
        raise GateError(
            f"evaluation gate: the {model_name} model's exact match {em:.3f} is below eval.min_exact_match "
            f"{threshold:.3f}; not deploying (see {results_file.with_suffix('.md')})"
        )
    return f"passed: exact match {em:.3f} >= {threshold:.3f}"


# ---- the command -------------------------------------------------------------------------------------
@dataclass
class Invocation:
    """How the user started this run, to tell them how to bring the endpoint back."""

    config_args: list[str] = field(default_factory=lambda: ["run.yaml"])  # the file, then any --set a=b
    keep_serving: bool = False


@dataclass
class PipelineResult:
    outcomes: list[Outcome]
    endpoint: Endpoint | None = None
    answers: list[dict[str, str]] = field(default_factory=list)
    gate: str = ""
    report: Path | None = None
    seconds: float = 0.0
    embedded: bool = True  # Ray (and so the endpoint) lives and dies with this command
    invocation: Invocation = field(default_factory=Invocation)


def with_absolute_storage(cfg: RunConfig) -> RunConfig:
    """The config with a local `cluster.storage_path` made absolute: Ray workers run in other folders,
    so every path a stage hands them (tokenizer, base model, run folder) must not depend on the cwd."""
    storage = cfg.cluster.storage_path
    if "://" in storage:
        return cfg
    cluster = cfg.cluster.model_copy(update={"storage_path": str(Path(storage).expanduser().resolve())})
    return cfg.model_copy(update={"cluster": cluster})


def run_pipeline(
    cfg: RunConfig,
    stages: list[Stage] | None = None,
    deploy_model_fn: Callable[[RunConfig, Path, Console], Endpoint] = deploy,
    console: Console | None = None,
    invocation: Invocation | None = None,
) -> PipelineResult:
    """Every stage, the gate, the deploy and the smoke requests; the report is written in any case."""
    import ray

    from cluster.local_ray import ensure_ray
    from cluster.preflight import preflight_pipeline
    from cluster.report import write_report

    console = console or Console()
    started = time.perf_counter()
    cfg = with_absolute_storage(cfg)
    embedded = not ray.is_initialized() and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    ensure_ray(cfg.cluster)
    preflight_pipeline(cfg, console)  # a run the cluster can never hold fails before the first stage
    quiet_data_progress()
    pipeline = Pipeline(cfg, stages if stages is not None else default_stages(), console)
    result = PipelineResult(pipeline.outcomes, embedded=embedded, invocation=invocation or Invocation())
    try:
        with pipeline.display:
            pipeline.run()
            name, folder = deploy_model(cfg)
            result.gate = check_gate(cfg, name)
            console.print(f"[green]✓[/] {'gate':<10} {result.gate}", highlight=False, soft_wrap=True)
            detail = verify_export(folder)
            pipeline.outcomes.append(Outcome(layout.Stage.EXPORT, "ran", 0.0, detail))
            console.print(f"[green]✓[/] {'export':<10} {folder}", highlight=False, soft_wrap=True)
            with pipeline.display.stage("deploy"):
                t0 = time.perf_counter()
                result.endpoint = deploy_model_fn(cfg, folder, console)
            seconds = time.perf_counter() - t0
            pipeline.outcomes.append(
                Outcome("deploy", "ran", seconds, {"base_url": result.endpoint.base_url})
            )
            console.print(
                f"[green]✓[/] {'deploy':<10} done in {seconds:.0f} s · {result.endpoint.base_url} "
                f"(model {result.endpoint.model})",
                highlight=False,
                soft_wrap=True,
            )
            with pipeline.display.stage("smoke", "asking held-out questions through the openai client"):
                t0 = time.perf_counter()
                result.answers = smoke_requests(
                    result.endpoint, smoke_questions(cfg), cfg.eval.max_new_tokens
                )
            seconds = time.perf_counter() - t0
            pipeline.outcomes.append(Outcome("smoke", "ran", seconds, {"requests": len(result.answers)}))
            console.print(
                f"[green]✓[/] {'smoke':<10} {len(result.answers)} answers through the openai client",
                highlight=False,
                soft_wrap=True,
            )
    except GateError as exc:
        result.gate = str(exc)
        raise
    finally:
        result.seconds = round(time.perf_counter() - started, 1)
        result.report = write_report(cfg, result)
    return result


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress (bars, or log lines when stdout is not a terminal) would bury
    the stage summaries; the stages print their own."""
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
