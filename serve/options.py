"""The one mapping from the `serve` section to Ray Serve deployment options.

`raylm serve`, `serve.app:build_app` and the Helm chart's `serveConfigV2` all call these functions, so a
value in run.yaml means the same thing wherever the app runs.
"""

from __future__ import annotations

from typing import Any

from serve.config import ServeConfig

LLM_DEPLOYMENT = "LLMServer"
HEADROOM_REQUESTS = 64  # /healthz, /metrics, /v1/models and requests about to be refused with a 503


def autoscaling_config(cfg: ServeConfig) -> dict[str, Any]:
    return {
        "min_replicas": cfg.min_replicas,
        "initial_replicas": max(cfg.min_replicas, 1),
        "max_replicas": max(cfg.max_replicas, cfg.min_replicas, 1),
        "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.autoscaling_look_back_period_s,
    }


def admitted_requests(cfg: ServeConfig) -> int | None:
    """Generation requests one replica holds (decoding or waiting) before it answers 503; None: no limit."""
    if cfg.max_queued_requests < 0:
        return None
    return cfg.max_ongoing_requests + cfg.max_queued_requests


def torch_threads(cfg: ServeConfig) -> int:
    """Torch threads of the replica's engine process. `num_cpus_per_replica` (the actor's `num_cpus`)
    reserves the CPUs of both of the replica's processes: the engine process computes, the replica
    process mostly waits on sockets, so by default the engine gets them all."""
    return cfg.torch_threads_per_replica or max(1, int(cfg.num_cpus_per_replica))


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Options of the one deployment `LLMServer` (model + OpenAI routes; `serve.deployment(**opts)`).

    The replica serves HTTP itself, so Serve's proxy must hand it every request: a rejection by Serve's
    router would reach the client as plain text, and the router counts a burst's not-yet-assigned
    requests as queued. So Serve's limits are the replica's own admission limit plus headroom (its
    queue that much per replica), and the replica answers requests beyond `max_ongoing_requests +
    max_queued_requests` with an OpenAI-shaped 503.
    """
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus_per_replica}
    if cfg.num_gpus_per_replica:
        actor["num_gpus"] = cfg.num_gpus_per_replica
    admitted = admitted_requests(cfg)
    per_replica = (admitted or cfg.max_ongoing_requests) + HEADROOM_REQUESTS
    return {
        "name": LLM_DEPLOYMENT,
        "autoscaling_config": autoscaling_config(cfg),
        "max_ongoing_requests": per_replica,
        "max_queued_requests": -1 if admitted is None else per_replica * max(cfg.max_replicas, 1),
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": min(2.0, max(cfg.graceful_shutdown_timeout_s, 0.1)),
        "ray_actor_options": actor,
    }


def app_deployments(cfg: ServeConfig) -> list[dict[str, Any]]:
    """Every deployment of the app, as serveConfigV2 lists them (one: the routes live on the model)."""
    return [deployment_options(cfg)]
