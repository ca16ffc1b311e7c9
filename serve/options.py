"""The one mapping from the `serve` section to Ray Serve deployment options.

`raylm serve`, `serve.app:build_app` and the Helm chart's `serveConfigV2` all call these functions, so a
value in run.yaml means the same thing wherever the app runs.
"""

from __future__ import annotations

from typing import Any

from serve.config import ServeConfig

LLM_DEPLOYMENT = "LLMServer"
INGRESS_DEPLOYMENT = "OpenAIIngress"


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


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Options of the model deployment `LLMServer` (`serve.deployment(**opts)`, serveConfigV2)."""
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus_per_replica}
    if cfg.num_gpus_per_replica:
        actor["num_gpus"] = cfg.num_gpus_per_replica
    return {
        "name": LLM_DEPLOYMENT,
        "autoscaling_config": autoscaling_config(cfg),
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": min(2.0, max(cfg.graceful_shutdown_timeout_s, 0.1)),
        "ray_actor_options": actor,
    }


def ingress_options(cfg: ServeConfig) -> dict[str, Any]:
    """Options of the HTTP ingress (`OpenAIIngress`): one light replica; backpressure lives in LLMServer.

    Its own limit is large (every queued and running model request plus headroom), so the 503 a client
    sees comes from the model deployment's `max_queued_requests`, not from the ingress.
    """
    queued = cfg.max_queued_requests if cfg.max_queued_requests >= 0 else 10_000
    return {
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": cfg.ingress_replicas,
        "max_ongoing_requests": cfg.max_ongoing_requests * max(cfg.max_replicas, 1) + queued + 64,
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": min(2.0, max(cfg.graceful_shutdown_timeout_s, 0.1)),
        "ray_actor_options": {"num_cpus": cfg.ingress_num_cpus},
    }
