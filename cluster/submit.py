"""Submit a raylm stage (or any command) to a remote Ray cluster through the Ray Jobs API.

What gets shipped: the repository as `working_dir` (top-level packages import as is there), minus
runs, checkpoints, virtualenvs, caches and `.git`, plus the *resolved* run config (overrides applied)
as `raylm_run.yaml` at the package root, which the entrypoint reads. The package is a zip built with
Ray's own packaging helper, so what the tests inspect is byte for byte what the cluster receives.

Submission ids are deterministic: `raylm-<stage>-<run name>-<digest>`, where the digest covers the
entrypoint, the resolved config and the code in the package. Submitting the same run again is
therefore idempotent (a retried CLI call attaches to the job already pending, running or done instead
of starting a second training run); after a FAILED or STOPPED attempt, or with `rerun=True`, the next
free id `...-r2`, `...-r3` is used (for train/finetune, `resume=True` makes the attempt continue from
the run's newest checkpoint instead of refusing an existing run). A pending or running attempt is
always reused, so two attempts never write to one run folder at once.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ray._private import ray_constants
from ray._private.runtime_env.packaging import create_package
from ray.job_submission import JobStatus

from cluster.config import RunConfig, dump_config
from cluster.jobs_client import JobsClient
from data_pipelines.layout import runnable_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_IN_PACKAGE = "raylm_run.yaml"
# gitwildmatch patterns relative to the repository root; .gitignore and Ray's defaults apply on top.
PACKAGE_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    ".tools",
    "runs",
    "checkpoints",
    "bench-results",
    "build",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    f"/{CONFIG_IN_PACKAGE}",
    "/third_party/kuberay",  # 3.4 MB of CRDs for the k8s tests; no job reads them (the corpus stays)
]
# Far below Ray's 512 MiB GCS limit: a package this big means a data or model folder slipped in.
MAX_PACKAGE_BYTES = 100 * 1024 * 1024
_LIVE = {JobStatus.PENDING, JobStatus.RUNNING}

_quiet = logging.getLogger("raylm.package")
_quiet.setLevel(logging.WARNING)


class SubmitError(Exception):
    """A submission problem the user can fix (package too large, unknown stage); `str()` explains it."""


@dataclass(frozen=True)
class Package:
    """The zipped working_dir: where it is, how big, and a hash of its code (names + CRCs, not mtimes)."""

    path: Path
    size_bytes: int
    num_files: int
    code_hash: str

    def names(self) -> list[str]:
        with zipfile.ZipFile(self.path) as zf:
            return zf.namelist()


@dataclass
class Submission:
    """What was submitted (or found already submitted) and where."""

    submission_id: str
    address: str
    entrypoint: str
    status: JobStatus
    reused: bool
    package_bytes: int
    package_files: int
    metadata: dict[str, str] = field(default_factory=dict)
    runtime_env: dict = field(default_factory=dict)


def _is_uri(path: str) -> bool:
    return "://" in path


def config_for_cluster(cfg: RunConfig, cwd: Path | None = None) -> RunConfig:
    """The config the job itself reads on the cluster.

    `cluster.address` is cleared: the driver joins the cluster it runs on (Ray Jobs sets RAY_ADDRESS),
    not whatever address the submitter used. A relative local `storage_path` is made absolute against
    the submitter's directory; otherwise it would land inside the job's throw-away working_dir.
    """
    storage = cfg.cluster.storage_path
    if not _is_uri(storage) and not Path(storage).is_absolute():
        storage = str((cwd or Path.cwd()) / storage)
    cluster = cfg.cluster.model_copy(update={"address": None, "storage_path": storage})
    return cfg.model_copy(update={"cluster": cluster})


def config_hash(cfg: RunConfig) -> str:
    return cfg.section_hash(*RunConfig.model_fields)


def _excludes_for(cfg: RunConfig, root: Path) -> list[str]:
    """Static excludes, Ray's defaults, and a local storage_path that happens to live inside the repo."""
    excludes = PACKAGE_EXCLUDES + ray_constants.get_runtime_env_default_excludes()
    storage = cfg.cluster.storage_path
    if not _is_uri(storage):
        resolved = Path(storage).resolve()
        if resolved.is_relative_to(root.resolve()) and resolved != root.resolve():
            excludes.append("/" + resolved.relative_to(root.resolve()).as_posix())
    return excludes


def build_package(cfg: RunConfig, dest_dir: Path, root: Path = REPO_ROOT) -> Package:
    """Zip `root` the way Ray packages a working_dir, then add the resolved config as raylm_run.yaml."""
    zip_path = Path(dest_dir) / "raylm_working_dir.zip"
    zip_path.unlink(missing_ok=True)
    create_package(
        str(root), zip_path, include_gitignore=True, excludes=_excludes_for(cfg, root), logger=_quiet
    )
    with zipfile.ZipFile(zip_path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        entries = sorted((i.filename, i.CRC, i.file_size) for i in zf.infolist() if not i.is_dir())
        code_hash = hashlib.sha256(repr(entries).encode()).hexdigest()[:16]
        # A fixed timestamp keeps the zip (and so Ray's package URI) identical for identical inputs.
        info = zipfile.ZipInfo(CONFIG_IN_PACKAGE, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        zf.writestr(info, dump_config(cfg))
    size = zip_path.stat().st_size
    if size > MAX_PACKAGE_BYTES:
        raise SubmitError(
            f"working_dir package is {size / 2**20:.0f} MiB (limit {MAX_PACKAGE_BYTES // 2**20} MiB): "
            f"add large folders to .gitignore or .rayignore in {root}"
        )
    return Package(zip_path, size, len(entries) + 1, code_hash)


def git_commit(root: Path = REPO_ROOT) -> str:
    """HEAD's commit, with `-dirty` when tracked files changed; `unknown` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def build_runtime_env(cfg: RunConfig, working_dir: Path | str) -> dict:
    """runtime_env for the job: the package, `cluster.env_vars`, and `cluster.pip` when non-empty."""
    env: dict = {
        "working_dir": str(working_dir),
        "env_vars": {"PYTHONUNBUFFERED": "1", "RAYLM_CONFIG": CONFIG_IN_PACKAGE, **cfg.cluster.env_vars},
    }
    if cfg.cluster.pip:
        env["pip"] = list(cfg.cluster.pip)
    return env


def submission_base_id(label: str, entrypoint: str, cfg_hash: str, code_hash: str, run_name: str) -> str:
    digest = hashlib.sha256(f"{label}\n{entrypoint}\n{cfg_hash}\n{code_hash}".encode()).hexdigest()[:10]
    return f"raylm-{label}-{run_name}-{digest}"


def _stage_entrypoint(stage: str, resume: bool) -> str:
    from cluster.run_stage import RESUMABLE_STAGES, entrypoint

    try:
        stage = runnable_stage(stage)
    except ValueError as exc:
        raise SubmitError(str(exc)) from None
    if resume and stage not in RESUMABLE_STAGES:
        raise SubmitError(f"--resume applies to the stages {', '.join(RESUMABLE_STAGES)}, not {stage!r}")
    command = entrypoint(stage, CONFIG_IN_PACKAGE)
    return f"{command} --resume" if resume else command


def submit(
    cfg: RunConfig,
    *,
    stage: str | None = None,
    entrypoint: str | None = None,
    address: str | None = None,
    client: JobsClient | None = None,
    rerun: bool = False,
    resume: bool = False,
    root: Path = REPO_ROOT,
) -> Submission:
    """Submit `stage` (or a raw `entrypoint`, where `{config}` names the shipped config) for `cfg`.

    Returns the submission; `reused=True` when an identical job was already pending or running, or had
    succeeded and `rerun` is False.
    """
    if (stage is None) == (entrypoint is None):
        raise SubmitError("give exactly one of stage= or entrypoint=")
    command = _stage_entrypoint(stage, resume) if stage else entrypoint.replace("{config}", CONFIG_IN_PACKAGE)
    label = stage or "job"  # as the user typed it (`train`): the submission id they see and search for
    shipped = config_for_cluster(cfg)
    client = client or JobsClient(address, cfg.cluster.auth_token_file, default=cfg.cluster.dashboard_address)
    cfg_hash = config_hash(shipped)
    with tempfile.TemporaryDirectory(prefix="raylm-pkg-") as tmp:
        package = build_package(shipped, Path(tmp), root=root)
        base = submission_base_id(label, command, cfg_hash, package.code_hash, cfg.cluster.run_name)
        metadata = {
            "raylm.stage": label,
            "raylm.run_name": cfg.cluster.run_name,
            "raylm.config_hash": cfg_hash,
            "raylm.code_hash": package.code_hash,
            "raylm.git_commit": git_commit(root),
            "raylm.storage_path": shipped.cluster.storage_path,
        }
        runtime_env = build_runtime_env(shipped, package.path)

        def result(sid: str, status: JobStatus, reused: bool) -> Submission:
            return Submission(
                sid,
                client.address,
                command,
                status,
                reused,
                package.size_bytes,
                package.num_files,
                metadata,
                runtime_env,
            )

        attempt = 1
        while True:
            sid = base if attempt == 1 else f"{base}-r{attempt}"
            existing = client.find(sid)
            if existing is None:
                break
            # Never two live attempts of one run; a finished success is reused unless a rerun is asked.
            if existing.status in _LIVE or (existing.status == JobStatus.SUCCEEDED and not rerun):
                return result(sid, existing.status, reused=True)
            attempt += 1
        client.submit(
            entrypoint=command,
            submission_id=sid,
            runtime_env=runtime_env,
            metadata=metadata,
            entrypoint_num_cpus=cfg.cluster.entrypoint_num_cpus or None,
            entrypoint_num_gpus=cfg.cluster.entrypoint_num_gpus or None,
        )
        return result(sid, JobStatus.PENDING, reused=False)
