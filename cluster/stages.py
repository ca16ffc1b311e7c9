"""Which module runs each pipeline stage: the one mapping `raylm submit` and the KubeRay RayJob share.

Keeping it in one place is what guarantees a stage runs the same command locally, on a Ray cluster
and on Kubernetes.
"""

from __future__ import annotations

STAGE_MODULES: dict[str, str] = {
    "data": "data_pipelines.prepare",
    "train": "jobs.pretrain",
    "finetune": "jobs.finetune",
    "eval": "jobs.evaluate",
    "export": "jobs.export",
}


def entrypoint(stage: str, config_path: str) -> str:
    """The shell command that runs `stage` with the run file at `config_path`."""
    try:
        module = STAGE_MODULES[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}; allowed stages: {', '.join(STAGE_MODULES)}") from None
    return f"python -m {module} --config {config_path}"
