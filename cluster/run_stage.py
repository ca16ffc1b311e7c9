"""The one stage runner: load the run file, start or join Ray, check the demand, run one stage.

`python -m cluster.run_stage STAGE --config run.yaml [--set a.b=c] [--resume]` is the command a Ray
job (`raylm submit`) and a KubeRay RayJob run; `raylm train|finetune|eval` call `run_stage` in-process.
Keeping all three on this path is what makes a stage run the same way locally, on a Ray cluster and
on Kubernetes. The stage functions themselves (`jobs/`, `data_pipelines/`) take the config sections
they read and never load a file or start Ray.

Errors follow the CLI's rule: a problem the user can fix (bad config, missing corpus, a run that
cannot fit, an existing run without --resume) is one `error:` line and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console

from cluster.config import ConfigError, RunConfig, UserError, load_config
from data_pipelines.layout import RUNNABLE_STAGES, STAGE_NAMES, Stage, runnable_stage

RESUMABLE_STAGES: tuple[Stage, ...] = (Stage.PRETRAIN, Stage.FINETUNE)
RUNNER_MODULE = "cluster.run_stage"  # what Ray jobs and RayJobs run: `python -m cluster.run_stage STAGE`


class StageError(UserError):
    """A stage failed for a reason the user can fix; the message names the field or the file."""


def entrypoint(stage: str, config_path: str) -> str:
    """The shell command that runs `stage` with the run file at `config_path` (Ray job, RayJob)."""
    return f"python -m {RUNNER_MODULE} {runnable_stage(stage)} --config {config_path}"


# ---- the stages ---------------------------------------------------------------------------------------
def _tokens(cfg: RunConfig, resume: bool, console: Console) -> None:
    from data_pipelines.pipeline import prepare
    from data_pipelines.stats import CorpusStats

    manifest = prepare(cfg.data, cfg.tokenizer, cfg.run_dir())
    console.print(CorpusStats.from_dict(manifest["stats"]).table())


def _pretrain(cfg: RunConfig, resume: bool, console: Console) -> None:
    from jobs.pretrain import run

    console.print(f"[green]done[/] checkpoint {run(cfg, resume=resume).checkpoint}")


def _finetune(cfg: RunConfig, resume: bool, console: Console) -> None:
    from jobs.finetune import run

    console.print(f"fine-tuned model: {run(cfg, resume=resume)}")


def _eval(cfg: RunConfig, resume: bool, console: Console) -> None:
    from jobs.evaluate import results_markdown, run

    console.print(results_markdown(run(cfg)), markup=False, highlight=False)


def _export(cfg: RunConfig, resume: bool, console: Console) -> None:
    from jobs.export import export

    layout = cfg.layout()
    console.print(str(export(layout.stage_dir(Stage.PRETRAIN), layout.pretrained, cfg.cluster.storage_path)))


def _corpus_exists(cfg: RunConfig) -> None:
    """A missing corpus path fails before Ray starts (starting Ray first would turn it into exit 1)."""
    if cfg.data.paths:
        from data_pipelines.readers import list_inputs

        list_inputs(cfg.data.paths, cfg.data.format)


def _exports_load(cfg: RunConfig) -> None:
    """A broken export fails in one line before Ray starts."""
    from cluster.model_folder import check_run_exports

    check_run_exports(cfg.run_dir())


@dataclass(frozen=True)
class StageRun:
    run: Callable[[RunConfig, bool, Console], None]
    uses_ray: bool  # False: the stage runs in this process only (no Ray, no capacity to check)
    before_ray: Callable[[RunConfig], None] | None = None


STAGE_RUNS: dict[Stage, StageRun] = {
    Stage.TOKENS: StageRun(_tokens, True, _corpus_exists),
    Stage.PRETRAIN: StageRun(_pretrain, True),
    Stage.FINETUNE: StageRun(_finetune, True),
    Stage.EVAL: StageRun(_eval, True, _exports_load),
    Stage.EXPORT: StageRun(_export, False),
}
assert tuple(STAGE_RUNS) == RUNNABLE_STAGES


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions of the stage code that mean bad input, not a bug (imported late: they pull torch)."""
    from data_pipelines.pipeline import DataPipelineError
    from data_pipelines.readers import CorpusNotFoundError
    from jobs.export import ExportError
    from jobs.finetune import FinetuneError
    from jobs.sft_data import SftDataError
    from jobs.train_loop import RunExistsError

    return (DataPipelineError, CorpusNotFoundError, ExportError, FinetuneError, SftDataError, RunExistsError)


def run_stage(
    stage: Stage | str, cfg: RunConfig, resume: bool = False, console: Console | None = None
) -> None:
    """Run one stage of `cfg` on the Ray it starts or joins; user errors raise StageError (exit 2)."""
    from cluster.local_ray import ensure_ray
    from cluster.preflight import preflight

    stage = runnable_stage(stage)
    console = console or Console()
    if resume and stage not in RESUMABLE_STAGES:
        raise StageError(f"--resume applies to the stages {', '.join(RESUMABLE_STAGES)}, not {stage!r}")
    spec = STAGE_RUNS[stage]
    try:
        if spec.before_ray:
            spec.before_ray(cfg)
        estimate = None
        if spec.uses_ray:
            ensure_ray(cfg.cluster)
            estimate = preflight(cfg, stage, console)  # a run that can never fit fails here
        spec.run(cfg, resume, console)
        if estimate is not None:  # the summary's last line: what the run was estimated to need
            console.print(f"memory: {estimate.short()}", highlight=False)
    except (FileNotFoundError, *user_errors()) as exc:
        raise StageError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.run_stage", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGE_NAMES, help="the stage to run")
    parser.add_argument("--config", required=True, help="run configuration YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override a.b=c")
    parser.add_argument("--resume", action="store_true", help="continue from the stage's newest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_stage(args.stage, load_config(args.config, args.overrides), resume=args.resume)
    except (ConfigError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
