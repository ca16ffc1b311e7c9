"""Real jobs through the Ray Jobs API: success with shipped config and env vars, idempotent resubmit,
a failing job's status and exit code, and stopping a running job, via the Python API and the CLI."""

from __future__ import annotations

import time
from pathlib import Path

from ray.job_submission import JobStatus

from cluster.config import load_config
from cluster.jobs_client import STOPPED_EXIT_CODE, JobsClient
from cluster.local_cluster import free_port
from cluster.submit import submit


def test_job_runs_in_shipped_package_and_resubmit_is_idempotent(
    jobs: JobsClient, tiny_project: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        None,
        [
            "cluster.run_name=hello",
            "train.max_steps=11",
            f"cluster.storage_path={tmp_path / 'runs'}",
            "cluster.env_vars={RAYLM_TEST_VAR: shipped}",
        ],
    )
    sub = submit(cfg, entrypoint="python hello.py {config}", client=jobs, root=tiny_project)
    assert not sub.reused and sub.submission_id.startswith("raylm-job-hello-")
    logs: list[str] = []
    outcome = jobs.wait(sub.submission_id, on_log=logs.append)
    assert (outcome.status, outcome.exit_code) == (JobStatus.SUCCEEDED, 0)

    text = "".join(logs)
    assert "run_name hello max_steps 11" in text  # the resolved config, overrides applied
    assert "env shipped" in text  # cluster.env_vars
    files_line = next(line for line in text.splitlines() if line.startswith("files "))
    assert "'hello.py'" in files_line and "'raylm_run.yaml'" in files_line
    assert not any(f"'{junk}'" in files_line for junk in (".git", "runs", ".venv", ".tools"))
    assert jobs.logs(sub.submission_id).count("run_name hello") == 1

    info = jobs.info(sub.submission_id)
    assert info.metadata["raylm.config_hash"] == sub.metadata["raylm.config_hash"]
    assert info.metadata["raylm.run_name"] == "hello" and info.metadata["raylm.git_commit"]

    again = submit(cfg, entrypoint="python hello.py {config}", client=jobs, root=tiny_project)
    assert again.reused and again.submission_id == sub.submission_id and again.status == JobStatus.SUCCEEDED
    ids = [j.submission_id for j in jobs.list()]
    assert ids.count(sub.submission_id) == 1


def test_failing_job_reports_status_and_exit_code(
    cli, dashboard: str, jobs: JobsClient, tiny_project: Path
) -> None:
    cfg = load_config(None, ["cluster.run_name=failing"])
    sub = submit(
        cfg,
        entrypoint="python -c \"import sys; print('failing on purpose'); sys.exit(3)\"",
        client=jobs,
        root=tiny_project,
    )
    # `logs --follow` behaves like `submit --wait`: stream, then exit with the job's outcome.
    followed = cli("jobs", "logs", sub.submission_id, "--follow", "--address", dashboard)
    assert followed.returncode == 3, followed.stderr
    assert "failing on purpose" in followed.stdout and "FAILED" in followed.stdout

    status = cli("jobs", "status", sub.submission_id, "--address", dashboard)
    assert status.returncode == 0
    assert "FAILED" in status.stdout and "exit code" in status.stdout and " 3" in status.stdout

    # A failed attempt is not reused: the same submission gets the next attempt id.
    retry = submit(cfg, entrypoint="python -c 'print(1)'", client=jobs, root=tiny_project)
    assert retry.submission_id != sub.submission_id
    assert jobs.wait(retry.submission_id).exit_code == 0


def test_stop_a_running_job(cli, dashboard: str, jobs: JobsClient, tiny_project: Path) -> None:
    cfg = load_config(None, ["cluster.run_name=sleeper"])
    sub = submit(
        cfg,
        entrypoint="python -c \"import time; print('sleeping', flush=True); time.sleep(600)\"",
        client=jobs,
        root=tiny_project,
    )
    deadline = time.monotonic() + 120
    while jobs.info(sub.submission_id).status != JobStatus.RUNNING:
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.5)

    listed = cli("jobs", "list", "--address", dashboard)
    assert listed.returncode == 0 and sub.submission_id in listed.stdout and "RUNNING" in listed.stdout

    stopped = cli("jobs", "stop", sub.submission_id, "--address", dashboard)
    assert stopped.returncode == 0, stopped.stderr
    assert "STOPPED" in stopped.stdout
    outcome = jobs.wait(sub.submission_id)
    assert (outcome.status, outcome.exit_code) == (JobStatus.STOPPED, STOPPED_EXIT_CODE)

    again = cli("jobs", "stop", sub.submission_id, "--address", dashboard)
    assert again.returncode == 0 and "already ended" in again.stdout


def test_unknown_job_and_unreachable_dashboard_are_clear_errors(cli, dashboard: str) -> None:
    unknown = cli("jobs", "status", "raylm-nope", "--address", dashboard)
    assert unknown.returncode == 2 and "no job with id 'raylm-nope'" in unknown.stderr
    down = cli("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2 and "cannot reach the Ray dashboard" in down.stderr
    assert "Traceback" not in unknown.stderr + down.stderr


def test_dashboard_address_precedence(monkeypatch, ray_cluster, tmp_path: Path) -> None:
    from cluster.jobs_client import ADDRESS_ENV, dashboard_address

    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    monkeypatch.setenv("RAYLM_STATE_DIR", str(tmp_path))  # no cluster recorded by `raylm cluster up`
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not a dashboard URL
    assert dashboard_address(None) == "http://127.0.0.1:8265"
    ray_cluster.save(tmp_path / "local-cluster.json")  # now one is recorded, and running
    assert dashboard_address(None) == ray_cluster.dashboard_url
    assert dashboard_address(None, default="http://cfg:8265") == "http://cfg:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://ray-address:8265")
    assert dashboard_address(None, default="http://cfg:8265") == "http://ray-address:8265"
    monkeypatch.setenv(ADDRESS_ENV, "env-head:8265")
    assert dashboard_address(None, default="http://cfg:8265") == "http://env-head:8265"
    assert dashboard_address("https://cli-head:8265/", default="http://cfg:8265") == "https://cli-head:8265"
