"""Render Kubernetes manifests for a run by feeding its typed config to the Helm chart `helm/raylm`.

The chart is the single source of truth for the manifests: this module only translates a RunConfig
into chart values and runs the real `helm template`. What must never drift from local runs comes from
the same Python the local commands use: the stage -> module map (`cluster.stages`) is passed in as
`stageModules`, and the Serve deployment options come from `serve.options` (what `raylm serve` uses),
so the RayJob entrypoint equals `raylm submit`'s and serveConfigV2 equals the local deployment.
"""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Literal

from cluster.config import ConfigError, RunConfig, dump_config
from cluster.k8s_config import SecretKeyRef
from cluster.stages import STAGE_MODULES
from cluster.tools.install_helm import helm_binary
from serve.options import app_deployments

Mode = Literal["job", "service", "cluster"]
MODES: tuple[str, ...] = ("job", "service", "cluster")
CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "raylm"


class RenderError(RuntimeError):
    """`helm template` refused the values (schema violation, template failure); message is helm's."""


def release_name(cfg: RunConfig, mode: str, stage: str = "train") -> str:
    """Object base name: k8s.release_name or the run name made a DNS-1035 label; a RayJob adds its stage.

    KubeRay rejects Ray object names that do not start with a letter, so such run names get a prefix.
    """
    base = cfg.k8s.release_name or re.sub(r"[^a-z0-9-]+", "-", cfg.cluster.run_name.lower()).strip("-")
    if not base[:1].isalpha():
        base = f"raylm-{base}"
    name = f"{base}-{stage}" if mode == "job" else base
    return name[:40].rstrip("-")


def _is_uri(path: str) -> bool:
    return "://" in path


def pod_config(cfg: RunConfig) -> RunConfig:
    """The run config as the pods must see it: storage on the shared volume (or a URI), Ray joined locally.

    Pods share no disk, so a local `cluster.storage_path` only works on the mounted PVC; anything else
    would silently scatter checkpoints across nodes, hence the error.
    """
    storage = cfg.cluster.storage_path
    mount = cfg.k8s.storage.mount_path
    has_pvc = bool(cfg.k8s.storage.pvc_claim_name or cfg.k8s.storage.create_pvc)
    if not _is_uri(storage):
        if not has_pvc:
            raise ConfigError(
                f"cluster.storage_path: got {storage!r}; on Kubernetes it must be an object-store URI "
                "(s3://, gs://) or live on a PVC: set k8s.storage.pvc_claim_name or k8s.storage.create_pvc"
            )
        if not posixpath.isabs(storage):
            storage = posixpath.join(mount, storage)
        elif not (storage == mount or storage.startswith(mount.rstrip("/") + "/")):
            raise ConfigError(
                f"cluster.storage_path: got {storage!r}; it must be under k8s.storage.mount_path {mount!r}"
            )
    cluster = cfg.cluster.model_copy(update={"storage_path": storage, "address": "auto"})
    return cfg.model_copy(update={"cluster": cluster})


def model_path(cfg: RunConfig) -> str:
    """Model folder the RayService serves: serve.model_path, else this run's export folder."""
    path = cfg.serve.model_path or f"{cfg.run_dir()}/export"
    if not _is_uri(path) and not posixpath.isabs(path):
        path = posixpath.join(cfg.k8s.storage.mount_path, path)
    return path


def _resources(r: Any) -> dict[str, Any]:
    return {"cpu": r.cpu, "memory": r.memory, "gpu": r.gpu}


def _tolerations(items: list[Any]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in items]


def _secret(ref: SecretKeyRef | None) -> dict[str, str]:
    return ref.model_dump() if ref else {"name": "", "key": ""}


def chart_values(cfg: RunConfig, mode: str, stage: str = "train") -> dict[str, Any]:
    """Chart values for `mode` built from the typed run config (the contract between CLI and chart)."""
    if mode not in MODES:
        raise ConfigError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "job" and stage not in STAGE_MODULES:
        raise ConfigError(f"stage: got {stage!r}; allowed stages: {', '.join(STAGE_MODULES)}")
    pod_cfg = pod_config(cfg)
    k = cfg.k8s
    serve = {key: v for key, v in cfg.serve.model_dump(mode="json").items() if v is not None}
    serve["model_path"] = model_path(pod_cfg)
    runtime_env: dict[str, Any] = {}
    if cfg.cluster.env_vars:
        runtime_env["env_vars"] = dict(cfg.cluster.env_vars)
    if cfg.cluster.pip:
        runtime_env["pip"] = list(cfg.cluster.pip)
    gcs = k.gcs_fault_tolerance
    return {
        "mode": mode,
        "nameOverride": release_name(cfg, mode, stage),
        "labels": dict(k.labels),
        "rayVersion": k.ray_version,
        "image": {"repository": k.image.repository, "tag": k.image.tag, "pullPolicy": k.image.pull_policy},
        "imagePullSecrets": list(k.image.pull_secrets),
        "serviceAccountName": k.service_account_name or "",
        "podSecurityContext": {
            "runAsNonRoot": True,
            "runAsUser": k.security.run_as_user,
            "runAsGroup": k.security.run_as_group,
            "fsGroup": k.security.fs_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "runConfig": dump_config(pod_cfg),
        "configMountPath": k.config_mount_path,
        "head": {
            "resources": _resources(k.head.resources),
            "nodeSelector": dict(k.head.node_selector),
            "tolerations": _tolerations(k.head.tolerations),
            "rayStartParams": dict(k.head.ray_start_params),
        },
        "workerGroups": [
            {
                "name": g.name,
                "replicas": g.replicas,
                "minReplicas": g.min_replicas,
                "maxReplicas": g.max_replicas,
                "resources": _resources(g.resources),
                "gpuResourceName": g.gpu_resource_name,
                "nodeSelector": dict(g.node_selector),
                "tolerations": _tolerations(g.tolerations),
                "rayStartParams": dict(g.ray_start_params),
            }
            for g in k.worker_groups
        ],
        "autoscaler": {
            "enabled": k.autoscaler.enabled,
            "idleTimeoutSeconds": k.autoscaler.idle_timeout_s,
            "upscalingMode": k.autoscaler.upscaling_mode,
        },
        "storage": {
            "mountPath": k.storage.mount_path,
            "pvc": {
                "claimName": k.storage.pvc_claim_name or "",
                "create": k.storage.create_pvc,
                "size": k.storage.pvc_size,
                "storageClassName": k.storage.storage_class_name or "",
            },
        },
        "gcsFaultTolerance": {
            "enabled": gcs.enabled,
            "redisAddress": gcs.redis_address,
            "redisPasswordSecret": _secret(gcs.redis_password_secret),
        },
        "apiKeySecret": {**_secret(k.api_key_secret), "env": cfg.serve.api_keys_env},
        "stageModules": dict(STAGE_MODULES),
        "job": {
            "stage": stage,
            "shutdownAfterJobFinishes": k.job.shutdown_after_finishes,
            "ttlSecondsAfterFinished": k.job.ttl_seconds_after_finished,
            "backoffLimit": k.job.backoff_limit,
            "activeDeadlineSeconds": k.job.active_deadline_seconds or 0,
            "submissionMode": k.job.submission_mode,
            "entrypointNumCpus": cfg.cluster.entrypoint_num_cpus,
            "entrypointNumGpus": cfg.cluster.entrypoint_num_gpus,
            "runtimeEnv": runtime_env,
        },
        "serve": serve,
        "serveDeployments": app_deployments(cfg.serve),
        "service": {"type": k.endpoint.service_type, "port": k.endpoint.port},
        "ingress": {
            "enabled": k.endpoint.ingress.enabled,
            "className": k.endpoint.ingress.class_name or "",
            "host": k.endpoint.ingress.host,
            "tlsSecretName": k.endpoint.ingress.tls_secret_name or "",
            "annotations": dict(k.endpoint.ingress.annotations),
        },
    }


def helm_template(values: dict[str, Any], release: str, namespace: str, chart: Path = CHART_DIR) -> str:
    """Run the real `helm template` with `values`; returns the multi-document YAML."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="raylm-values-") as f:
        json.dump(values, f)  # JSON is YAML, and keeps strings like "2" from turning into numbers
        f.flush()
        cmd = [helm_binary(), "template", release, str(chart), "--namespace", namespace, "-f", f.name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RenderError(f"helm template failed:\n{proc.stderr.strip()}")
    return proc.stdout


def render(cfg: RunConfig, mode: str, stage: str = "train") -> str:
    """Manifests (multi-document YAML) for `mode`, exactly as the chart renders them."""
    values = chart_values(cfg, mode, stage)
    return helm_template(values, values["nameOverride"], cfg.k8s.namespace)
