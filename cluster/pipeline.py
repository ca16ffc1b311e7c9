"""`raylm pipeline run.yaml`: corpus → tokenizer → token shards → pretrain → fine-tune → evaluate → export →
deploy on Ray Serve → smoke requests through the `openai` client, in one run folder.

Each cached stage records what it was computed from in `<run>/stages/<stage>.json`: a key hashed
from the config sections it reads plus the key and finish time of the stage before it. A stage whose
record matches and whose output still exists is skipped, so a rerun continues where the last one
stopped, and a config change re-runs the stage that reads the changed section and every stage after
it. (The records sit together in `stages/` rather than inside each output folder because the
training loop owns its stage folders and clears them when a fresh run starts.) A training stage that
was interrupted resumes from its newest complete checkpoint instead of starting over.

Between evaluation and deploy sits the gate: with `eval.min_exact_match` set, a model that scores
below it is not deployed and the command exits non-zero. Every run ends by writing `report.md`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster.config import RunConfig
from cluster.progress import StageDisplay, current_line, follow_metrics, training_summary

STAGES_DIR = "stages"
SERVE_APP_NAME = "raylm"
EXIT_GATE = 3

# Config fields that never change a stage's output: the gate only decides whether to deploy.
HASH_EXCLUDE: dict[str, set[str]] = {"eval": {"min_exact_match"}}


class PipelineError(RuntimeError):
    """A stage failed in a way the user can act on; the message says which stage and why."""


class GateError(PipelineError):
    """The evaluation gate stopped the deploy."""


# ---- stage records -----------------------------------------------------------------------------------
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
        self.outcomes: list[Outcome] = []

    def record_path(self, stage: Stage) -> Path:
        return self.run_dir / STAGES_DIR / f"{stage.name}.json"

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


# ---- the stages --------------------------------------------------------------------------------------
def _run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir())


def _data_stage(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from data_pipelines.pipeline import resolve_corpus

    data, files = resolve_corpus(cfg.data, cfg.run_dir())
    summary = {
        "inputs": [f.uri for f in files][:20],
        "num_inputs": len(files),
        "bytes": sum(f.size for f in files),
        "demo": not cfg.data.paths,
    }
    out = _run_dir(cfg) / "data" / "inputs.json"
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

    stage_dir = _run_dir(cfg) / "pretrain"
    with follow_metrics(stage_dir, cfg.train.max_steps):
        result = run(cfg, resume=resume)
    summary = training_summary(stage_dir)
    return {"export": str(result.export_dir), "checkpoint": str(result.checkpoint), "summary": summary}


def _finetune_stage(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.finetune import run

    stage_dir = _run_dir(cfg) / "finetune"
    with follow_metrics(stage_dir, cfg.finetune.max_steps):
        export = run(cfg, resume=resume)
    return {"export": str(export), "summary": training_summary(stage_dir)}


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


def export_dir(cfg: RunConfig, name: str) -> Path:
    return _run_dir(cfg) / "export" / name


def default_stages() -> list[Stage]:
    """The pipeline's cached stages, in order, with the config sections each one reads."""
    return [
        Stage("data", ("data",), lambda c: _run_dir(c) / "data" / "inputs.json", _data_stage),
        Stage(
            "tokenizer",
            ("tokenizer",),
            lambda c: _run_dir(c) / "tokenizer" / "tokenizer.json",
            _tokenizer_stage,
        ),
        Stage(
            "tokens",
            (),
            _shards_manifest,
            _tokens_stage,
            applies=lambda c: c.data.mode == "materialize",
            why_not="data.mode is stream: pretraining tokenizes",
        ),
        Stage(
            "pretrain",
            ("model", "train"),
            lambda c: export_dir(c, "pretrained") / "config.json",
            _pretrain_stage,
            train_dir="pretrain",
        ),
        Stage(
            "finetune",
            ("finetune",),
            lambda c: export_dir(c, "finetuned") / "config.json",
            _finetune_stage,
            train_dir="finetune",
        ),
        Stage("eval", ("eval",), lambda c: _run_dir(c) / "eval" / "results.json", _eval_stage),
    ]


# ---- gate, export, deploy, smoke ---------------------------------------------------------------------
def deploy_model(cfg: RunConfig) -> tuple[str, Path]:
    """(name, folder) of the model to serve: `serve.model_path`, else the fine-tuned, else the pretrained."""
    if cfg.serve.model_path:
        return "configured", Path(cfg.serve.model_path)
    for name in ("finetuned", "pretrained"):
        if (export_dir(cfg, name) / "config.json").is_file():
            return name, export_dir(cfg, name)
    raise PipelineError(f"nothing to deploy: no exported model under {_run_dir(cfg) / 'export'}")


def check_gate(cfg: RunConfig, model_name: str) -> str:
    """Raise GateError when the deployed model's exact match is below `eval.min_exact_match`."""
    threshold = cfg.eval.min_exact_match
    if threshold is None:
        return "no gate (eval.min_exact_match unset)"
    results_file = _run_dir(cfg) / "eval" / "results.json"
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


def verify_export(folder: Path) -> dict[str, Any]:
    """The folder is a loadable HF model: config, safetensors weights, tokenizer."""
    from transformers import AutoConfig

    missing = [
        f for f in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (folder / f).is_file()
    ]
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if missing or not weights:
        raise PipelineError(f"export {folder} is incomplete: missing {missing or ['*.safetensors']}")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return {"path": str(folder), "model_type": config.model_type, "weights": weights}


@dataclass
class Endpoint:
    base_url: str
    model: str
    api_key: str | None
    key_source: str
    key_file: Path | None = None  # set when the key was generated into the run folder


def resolve_api_key(cfg: RunConfig, console: Console) -> tuple[str | None, str]:
    """The key clients should use. A configured key is used as is and never printed; with none
    configured, one is generated for this local deploy, saved 0600 in the run folder and shown once."""
    from serve.auth import load_key_digests

    if not cfg.serve.require_api_key:
        return None, "none (serve.require_api_key is false)"
    if load_key_digests(cfg.serve):
        source = (
            f"${cfg.serve.api_keys_env}" if os.environ.get(cfg.serve.api_keys_env) else cfg.serve.api_key_file
        )
        first = [k.strip() for k in os.environ.get(cfg.serve.api_keys_env, "").split(",") if k.strip()]
        if not first and cfg.serve.api_key_file:
            lines = Path(cfg.serve.api_key_file).expanduser().read_text().splitlines()
            first = [k.strip() for k in lines if k.strip() and not k.startswith("#")]
        return first[0], f"configured ({source})"
    key = "rlm-" + secrets.token_urlsafe(24)
    key_file = _run_dir(cfg) / "serve" / "api_key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    os.environ[cfg.serve.api_keys_env] = key  # build_app reads the keys here, in the driver
    console.print(
        f"[bold]generated an API key[/] for this local deploy (saved to {key_file}, mode 600):\n"
        f"  export OPENAI_API_KEY=$(cat {key_file})",
        soft_wrap=True,
    )
    return key, f"generated ({key_file})"


def serve_logging() -> dict[str, Any]:
    """Serve's logging config: no per-request access log lines unless the user asked for --verbose
    (request counts and latencies stay available at /metrics)."""
    from cluster.logs import verbose

    return {"enable_access_log": verbose()}


def deploy(cfg: RunConfig, folder: Path, console: Console, app_name: str = SERVE_APP_NAME) -> Endpoint:
    """Run the OpenAI-compatible Serve app on `folder` and wait until it answers."""
    from ray import serve

    from serve.app import build_app

    key, source = resolve_api_key(cfg, console)
    section = cfg.serve.model_dump(mode="json") | {"model_path": str(folder)}
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=serve_logging())
    app = build_app({"model_path": str(folder), "serve": section})
    current_line().update(f"starting {folder.name} on Ray Serve (replicas load the weights)")
    serve.run(app, name=app_name, route_prefix=cfg.serve.route_prefix, logging_config=serve_logging())
    http = serve.context._get_global_client().http_config  # the proxy that runs, if Serve was already up
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    base = f"http://{host}:{http.port}{cfg.serve.route_prefix.rstrip('/')}/v1"
    key_file = _run_dir(cfg) / "serve" / "api_key" if source.startswith("generated") else None
    return Endpoint(base, cfg.serve.model_name or folder.name, key, source, key_file)


def smoke_requests(endpoint: Endpoint, questions: list[str], max_tokens: int) -> list[dict[str, str]]:
    """Ask the endpoint through the official `openai` client, as any user would."""
    from openai import OpenAI

    client = OpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key or "unused", max_retries=2, timeout=120
    )
    served = [m.id for m in client.models.list().data]
    model = endpoint.model if endpoint.model in served else served[0]
    answers = []
    for q in questions:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0
        )
        answers.append({"question": q, "answer": reply.choices[0].message.content or ""})
    return answers


def smoke_questions(cfg: RunConfig, n: int = 3) -> list[str]:
    from jobs.evaluate import eval_pair_paths
    from jobs.sft_data import load_records, pair_of

    records = load_records(eval_pair_paths(cfg))
    step = max(1, len(records) // n)
    return [pair_of(r)[0][-1]["content"] for r in records[::step][:n]]


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


def endpoint_lifetime(result: PipelineResult) -> list[str]:
    """Plain sentences for the terminal and report.md: does the endpoint outlive the command, and
    which command brings it back. Commands are in backticks."""
    ep = result.endpoint
    if ep is None:
        return []
    args = result.invocation.config_args
    serve_args = [*args, "--set", f"serve.api_key_file={ep.key_file}"] if ep.key_file else args
    again = f"`{shlex.join(['raylm', 'serve', *serve_args])}`"
    chat = f"`{shlex.join(['raylm', 'chat', *args])}`"
    if not result.embedded:
        return [
            f"The endpoint {ep.base_url} keeps running on the Ray cluster this command joined "
            f"(Serve application `{SERVE_APP_NAME}`); chat with it: "
            f"`raylm chat --base-url {ep.base_url}`.",
        ]
    if result.invocation.keep_serving:
        when = "was served until the command was interrupted (--keep-serving), then stopped with it"
    else:
        when = "stopped when the command ended"
    return [
        f"The endpoint {ep.base_url} ran on this command's embedded Ray and {when}.",
        f"Bring it back: {again}; or chat with the model: {chat} (it starts its own endpoint).",
        f"To keep it up after the pipeline: `{shlex.join(['raylm', 'pipeline', *args])} --keep-serving`.",
    ]


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
            pipeline.outcomes.append(Outcome("export", "ran", 0.0, detail))
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
