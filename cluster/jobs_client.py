"""A thin client over Ray's Jobs API: list, inspect, tail, stop and wait for jobs on a remote cluster.

It wraps `ray.job_submission.JobSubmissionClient` for two reasons: every failure a user can fix (wrong
address, wrong or missing token, unknown job id) becomes one exception with a readable message, and a
finished job maps to a process exit code, so `raylm submit --wait` can be used in shell pipelines.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from cluster.auth import AuthError, Token, client_token, explain_rejection

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Exit code of `--wait` for a job someone stopped: distinct from any driver exit code a job reports
# for its own failure, and the shell's convention for "interrupted".
STOPPED_EXIT_CODE = 130
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


class JobsError(Exception):
    """A Jobs API problem a user can act on (unreachable dashboard, unknown job); `str()` explains it."""


class JobNotFound(JobsError):
    pass


def dashboard_address(address: str | None = None, default: str | None = None) -> str:
    """The Jobs API URL: explicit --address, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS
    (as Ray's own job CLI accepts), else `default`, else the running cluster `raylm cluster up`
    recorded, else localhost.

    A bare host:port gets `http://`, since the dashboard only speaks HTTP(S).
    """
    ray_address = os.environ.get(RAY_ADDRESS_ENV, "")
    http_ray_address = ray_address if ray_address.startswith(("http://", "https://")) else None
    chosen = (
        address
        or os.environ.get(ADDRESS_ENV)
        or http_ray_address
        or default
        or _recorded_cluster()
        or DEFAULT_DASHBOARD
    )
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    return chosen.rstrip("/")


def _recorded_cluster() -> str | None:
    """The dashboard of the local cluster `raylm cluster up` started, while it runs."""
    from cluster.local_cluster import LocalCluster, state_file

    cluster = LocalCluster.load(state_file())
    return cluster.dashboard_url if cluster is not None and cluster.is_up() else None


@contextmanager
def given_address_only() -> Iterator[None]:
    """While constructing a Ray SDK client, hide RAY_ADDRESS and RAY_API_SERVER_ADDRESS.

    Ray's SDK lets those variables override the address it is given; on a machine that also runs a
    local Ray (RAY_ADDRESS set), `raylm jobs list --address http://other:8265` would silently talk to
    the local cluster. The address was already resolved by `dashboard_address`, so it must win.
    """
    saved = {key: os.environ.pop(key) for key in (ADDRESS_ENV, RAY_ADDRESS_ENV) if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended, and the exit code `raylm submit --wait` returns for it."""

    submission_id: str
    status: JobStatus
    exit_code: int
    message: str


def outcome_of(job: JobDetails) -> JobOutcome:
    """0 for SUCCEEDED; the driver's own exit code (or 1) for FAILED; 130 for STOPPED."""
    if job.status == JobStatus.SUCCEEDED:
        code = 0
    elif job.status == JobStatus.STOPPED:
        code = STOPPED_EXIT_CODE
    else:
        code = job.driver_exit_code or 1
    return JobOutcome(job.submission_id or job.job_id or "?", job.status, code, job.message or "")


class JobsClient:
    """Jobs API calls against one dashboard address, with the raylm token resolution applied."""

    def __init__(self, address: str | None = None, token_file: str | None = None, default: str | None = None):
        self.address = dashboard_address(address, default)
        self._token: Token | None = client_token(self.address, token_file)
        with self._errors(), given_address_only():
            self._client = JobSubmissionClient(
                self.address, headers=self._token.headers() if self._token else None
            )

    @contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        """Turn the SDK's exceptions into AuthError / JobsError with a message that says what to do."""
        try:
            yield
        except AuthenticationError as exc:
            raise AuthError(explain_rejection(self.address, exc.message, self._token)) from None
        except (ConnectionError, requests.exceptions.ConnectionError):
            raise JobsError(
                f"cannot reach the Ray dashboard at {self.address}: is the cluster up, and is --address "
                "the dashboard URL (http://HEAD:8265)?"
            ) from None
        except RuntimeError as exc:
            if job_id is not None and "status code 404" in str(exc):
                raise JobNotFound(
                    f"no job with id {job_id!r} on {self.address} (see `raylm jobs list`)"
                ) from None
            raise

    @property
    def sdk(self) -> JobSubmissionClient:
        """The underlying Ray client, for calls this wrapper does not cover."""
        return self._client

    def node_resources(self) -> list[dict[str, float]]:
        """Total resources of each alive node, from the dashboard's State API (no Ray connection)."""
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        headers = {"Content-Type": "application/json", **(self._token.headers() if self._token else {})}
        with self._errors(), given_address_only():
            client = StateApiClient(address=self.address, headers=headers)
            nodes = client.list(
                StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
            )
        return [dict(n.resources_total or {}) for n in nodes if n.state == "ALIVE"]

    def submit(self, **kwargs) -> str:
        """`JobSubmissionClient.submit_job` with error translation; returns the submission id."""
        with self._errors():
            return self._client.submit_job(**kwargs)

    def list(self) -> list[JobDetails]:
        """Every job the cluster knows, newest first."""
        with self._errors():
            jobs = self._client.list_jobs()
        return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)

    def info(self, job_id: str) -> JobDetails:
        with self._errors(job_id):
            return self._client.get_job_info(job_id)

    def find(self, job_id: str) -> JobDetails | None:
        """Like `info`, but None for an unknown id (used to make submission idempotent)."""
        try:
            return self.info(job_id)
        except JobNotFound:
            return None

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def follow(self, job_id: str, on_log: Callable[[str], None]) -> None:
        """Stream the job's logs to `on_log` until the job ends (the SDK's websocket closes then)."""
        self.info(job_id)  # a clean JobNotFound instead of a websocket error

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                on_log(chunk)

        with self._errors(job_id):
            asyncio.run(tail())

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop the job; False when it had already ended."""
        with self._errors(job_id):
            return self._client.stop_job(job_id)

    def wait(
        self,
        job_id: str,
        on_log: Callable[[str], None] | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> JobOutcome:
        """Block until the job ends (streaming its logs to `on_log` if given) and return its outcome.

        The log stream can close a moment before the job's status turns terminal, so the status is
        polled afterwards either way. Raises TimeoutError after `timeout_s` (the job keeps running).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if on_log is not None:
            self.follow(job_id, on_log)
        while True:
            job = self.info(job_id)
            if job.status in TERMINAL:
                return outcome_of(job)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout_s} s")
            time.sleep(poll_s)
