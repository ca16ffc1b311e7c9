"""Start or join Ray the same way for every command, so a job runs unchanged locally and on a cluster."""

from __future__ import annotations

import logging
import os

import ray

from cluster.config import ClusterConfig

log = logging.getLogger(__name__)


def default_local_cpus() -> int:
    """Twice the cores: Ray Train workers and Ray Data tasks must both get a logical CPU on small hosts.

    With exactly as many logical CPUs as cores, two train workers can starve Ray Data's read/map tasks
    and the run deadlocks; torch threads are capped per worker, so the cores are not oversubscribed.
    """
    return max(4, 2 * (os.cpu_count() or 1))


def ensure_ray(cfg: ClusterConfig) -> None:
    """Join `cluster.address` (or RAY_ADDRESS), else start an embedded local Ray with token auth on."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        from cluster.auth import ray_auth_errors

        with ray_auth_errors(address):
            ray.init(address=address, log_to_driver=True)
        log.info("joined Ray at %s", address)
        return
    ray.init(num_cpus=cfg.local_num_cpus or default_local_cpus(), include_dashboard=False)
    log.info("started embedded Ray with %s logical CPUs", ray.cluster_resources().get("CPU"))
