"""Ray Serve direct ingress: each endpoint replica serves HTTP on its own port, with no proxy hop.

Why: through Serve's proxy every request and every streamed chunk crosses one more process (client →
proxy → replica over Ray's actor streaming → proxy → client). Measured on the 2-core dev machine with
the benchmark's tiny model: a 1-token completion takes 10.7 ms through the proxy and 4.4 ms straight
to the replica, and for one streaming client the proxy costs ~0.5 ms of CPU per generated token, as
much as a third of a decode step. Ray Serve turns direct ingress on with one environment variable
that its controller and replicas read when they start, so it has to be in the environment of the
Ray job that starts Serve (`cluster.local_ray.ensure_ray` adds it to the job's runtime_env, which
Serve's actors inherit). Serve's proxy keeps running on the head node and still routes `serve.port`
across every replica (the stable, autoscaled endpoint); the replicas' own ports (allocated by the
controller, 30000-31000 by default) are what a client of a one-replica app or a load balancer that
reads Serve's target groups connects to.
"""

from __future__ import annotations

import os

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def direct_ingress_env() -> dict[str, str]:
    """The env vars that turn direct ingress on for the Serve controller and replicas of a Ray job.

    Serve holds a stopping direct-ingress replica open for 30 s by default so that an external load
    balancer can deregister it first; raylm's clients reach a replica directly or through the proxy,
    which stop sending to it as soon as the controller says so, so 1 s is enough (a stopping replica
    still finishes its in-flight requests, up to `serve.graceful_shutdown_timeout_s`).
    """
    return {DIRECT_INGRESS_ENV: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def direct_ingress_enabled() -> bool:
    """Whether this driver's Ray job (or its process) asked for direct ingress."""
    import ray

    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    return "1" in (job_env.get(DIRECT_INGRESS_ENV), os.environ.get(DIRECT_INGRESS_ENV))


def replica_urls(app_name: str) -> list[str]:
    """`http://host:port` of each running replica of `app_name` that serves HTTP itself.

    Empty when direct ingress is off (every request then goes through Serve's proxy). Call it once the
    app runs (`serve.run` returned): a replica starts its server before it reports ready. A replica
    binds the proxy's host (`serve.host`): loopback stays loopback, a wildcard host is reached at the
    replica's node address.
    """
    if not direct_ingress_enabled():
        return []
    import ray
    from ray import serve
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX, RequestProtocol

    client = serve.context._get_global_client()
    http_host = client.http_config.host
    groups = ray.get(client._controller.get_target_groups.remote(app_name))
    return [
        f"http://{target.ip if http_host in WILDCARD_HOSTS else http_host}:{target.port}"
        for group in groups
        if group.protocol == RequestProtocol.HTTP
        for target in group.targets
        # without direct ingress on the cluster (Serve started by a job without it) the targets are proxies
        if (target.name or "").startswith(REPLICA_ID_FULL_ID_STR_PREFIX)
    ]
