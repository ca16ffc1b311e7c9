"""Start or join Ray the same way for every command, so a job runs unchanged locally and on a cluster."""

from __future__ import annotations

import logging
import os

import ray

from cluster.config import ClusterConfig
from data_pipelines.readers import object_store_env
from serve.direct_ingress import direct_ingress_env

log = logging.getLogger(__name__)


def default_local_cpus() -> int:
    """Twice the cores: Ray Train workers and Ray Data tasks must both get a logical CPU on small hosts.

    With exactly as many logical CPUs as cores, two train workers can starve Ray Data's read/map tasks
    and the run deadlocks; torch threads are capped per worker, so the cores are not oversubscribed.
    """
    return max(4, 2 * (os.cpu_count() or 1))


def ensure_ray(cfg: ClusterConfig, log_to_driver: bool = True) -> None:
    """Join `cluster.address` (or RAY_ADDRESS), else start an embedded local Ray with token auth on.

    `log_to_driver=False` keeps the workers' output in Ray's session logs instead of this process's
    terminal (`raylm chat` uses it while it owns the terminal). Object-store credentials set here
    (AWS_*) go to every task and actor of the job, so Ray Train and Ray Data reach an s3:// storage
    path from nodes that do not have them; so does Serve's direct-ingress switch
    (`cluster.serve_direct_ingress`, see `serve.direct_ingress`), read by the Serve actors it starts.
    """
    if ray.is_initialized():
        return
    env = object_store_env()
    if cfg.serve_direct_ingress:  # a submitted job may already have these (Ray refuses a conflict)
        env |= {k: v for k, v in direct_ingress_env().items() if k not in os.environ}
    runtime_env = {"env_vars": env} if env else None
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        from cluster.auth import ray_auth_errors

        with ray_auth_errors(address):
            ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
        log.info("joined Ray at %s", address)
        return
    ray.init(
        num_cpus=cfg.local_num_cpus or default_local_cpus(),
        include_dashboard=False,
        log_to_driver=log_to_driver,
        runtime_env=runtime_env,
    )
    log.info("started embedded Ray with %s logical CPUs", ray.cluster_resources().get("CPU"))
