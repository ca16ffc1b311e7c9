"""Render Kubernetes manifests for a run by feeding its typed config to the Helm chart `helm/raylm`.

The chart is the single source of truth for the manifests: this module only translates a RunConfig
into chart values and runs the real `helm template`. What must never drift from local runs comes from
the same Python the local commands use: the stage runner and its stages (`cluster.run_stage`) are
passed in as `stageRunner` and `stages`, and the Serve deployment options come from `serve.options`
(what `raylm serve` uses), so the RayJob entrypoint equals `raylm submit`'s and serveConfigV2 equals
the local deployment.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml

from cluster.config import ConfigError, RunConfig, dump_config
from cluster.k8s_config import SecretKeyRef
from cluster.kuberay_rules import operator_errors
from cluster.run_stage import RUNNER_MODULE
from cluster.tools.install_helm import helm_binary
from data_pipelines.layout import RUNNABLE_STAGES, STAGE_NAMES, Stage, runnable_stage
from serve.options import app_deployments

Mode = Literal["job", "service", "cluster"]
MODES: tuple[str, ...] = ("job", "service", "cluster")
CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "raylm"


class RenderError(RuntimeError):
    """`helm template` refused the values (schema violation, template failure); message is helm's."""


def base_name(cfg: RunConfig) -> str:
    """k8s.release_name or the run name as a DNS-1035 label (KubeRay needs a leading letter)."""
    base = cfg.k8s.release_name or re.sub(r"[^a-z0-9-]+", "-", cfg.cluster.run_name.lower()).strip("-")
    if not base[:1].isalpha():
        base = f"raylm-{base}"
    return base[:40].rstrip("-")


def config_hash(cfg: RunConfig, stage: str) -> str:
    """Six hex digits that change whenever the job's run file or Kubernetes layout changes."""
    text = json.dumps([stage, cfg.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def release_name(cfg: RunConfig, mode: str, stage: str = Stage.PRETRAIN) -> str:
    """Object base name; a RayJob adds its stage and a hash of the config.

    A RayJob runs once: re-applying a finished one changes nothing in KubeRay. With the config hash in its
    name a changed config is a new RayJob (a new run), and the same config names the same RayJob, which
    `apply` refuses to re-run once finished. 40 + 7 characters keep within KubeRay's 47 for RayJobs.
    """
    base = base_name(cfg)
    if mode != "job":
        return base
    stage = runnable_stage(stage)  # `train` and `pretrain` name the same RayJob
    return f"{f'{base}-{stage}'[:40].rstrip('-')}-{config_hash(cfg, stage)}"


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


def _pod_options(g: Any) -> dict[str, Any]:
    """The PodOptions of a head or worker group in the chart's (Kubernetes) field names."""
    return {
        "nodeSelector": dict(g.node_selector),
        "tolerations": _tolerations(g.tolerations),
        "affinity": dict(g.affinity),
        "topologySpreadConstraints": list(g.topology_spread_constraints),
        "env": [
            {"name": e.name, **({"value": e.value} if e.value is not None else {"valueFrom": e.value_from})}
            for e in g.env
        ],
        "envFrom": list(g.env_from),
        "volumes": list(g.volumes),
        "volumeMounts": list(g.volume_mounts),
        "rayStartParams": dict(g.ray_start_params),
    }


def _peer(p: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.pod_labels is not None:
        out["podSelector"] = {"matchLabels": dict(p.pod_labels)} if p.pod_labels else {}
    if p.namespace_labels is not None:
        out["namespaceSelector"] = {"matchLabels": dict(p.namespace_labels)} if p.namespace_labels else {}
    return out or {"podSelector": {}}


def _secret(ref: SecretKeyRef | None) -> dict[str, str]:
    return ref.model_dump() if ref else {"name": "", "key": ""}


def chart_values(cfg: RunConfig, mode: str, stage: str = Stage.PRETRAIN) -> dict[str, Any]:
    """Chart values for `mode` built from the typed run config (the contract between CLI and chart)."""
    if mode not in MODES:
        raise ConfigError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "job":
        try:
            stage = runnable_stage(stage)
        except ValueError:
            raise ConfigError(f"stage: got {stage!r}; allowed stages: {', '.join(STAGE_NAMES)}") from None
    pod_cfg = pod_config(cfg)
    return {
        "mode": mode,
        "nameOverride": release_name(cfg, mode, stage),
        **_pod_values(cfg),
        "runConfig": dump_config(pod_cfg),
        "configMountPath": cfg.k8s.config_mount_path,
        **_cluster_values(cfg),
        **_job_values(cfg, stage),
        **_endpoint_values(cfg, pod_cfg),
    }


def _pod_values(cfg: RunConfig) -> dict[str, Any]:
    """What every pod carries: image, identity, scheduling and security settings."""
    k = cfg.k8s
    return {
        "labels": dict(k.labels),
        "rayVersion": k.ray_version,
        "image": {"repository": k.image.repository, "tag": k.image.tag, "pullPolicy": k.image.pull_policy},
        "imagePullSecrets": list(k.image.pull_secrets),
        "serviceAccountName": k.service_account_name or "",
        "serviceAccount": {
            "create": k.service_account.create,
            "name": k.service_account.name or "",
            "annotations": dict(k.service_account.annotations),
        },
        "rayAuth": {"enabled": k.ray_auth.enabled, "secretName": k.ray_auth.secret_name or ""},
        "networkPolicy": {
            "enabled": k.network_policy.enabled,
            "clients": [_peer(p) for p in k.network_policy.clients],
        },
        "priorityClassName": k.priority_class_name or "",
        "schedulerName": k.scheduler_name or "",
        "runtimeClassName": k.runtime_class_name or "",
        "kueueQueue": k.kueue_queue or "",
        "podSecurityContext": {
            "runAsNonRoot": True,
            "runAsUser": k.security.run_as_user,
            "runAsGroup": k.security.run_as_group,
            "fsGroup": k.security.fs_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _cluster_values(cfg: RunConfig) -> dict[str, Any]:
    """The Ray cluster: head, worker groups, autoscaler, shared storage, GCS fault tolerance."""
    k = cfg.k8s
    gcs = k.gcs_fault_tolerance
    return {
        "head": {"resources": _resources(k.head.resources), **_pod_options(k.head)},
        "workerGroups": [
            {
                "name": g.name,
                "replicas": g.replicas,
                "minReplicas": g.min_replicas,
                "maxReplicas": g.max_replicas,
                "resources": _resources(g.resources),
                "gpuResourceName": g.gpu_resource_name,
                **_pod_options(g),
                **({"idleTimeoutSeconds": g.idle_timeout_s} if g.idle_timeout_s is not None else {}),
            }
            for g in k.worker_groups
        ],
        "autoscaler": {
            "enabled": k.autoscaler.enabled,
            "version": k.autoscaler.version,
            "idleTimeoutSeconds": k.autoscaler.idle_timeout_s,
            "upscalingMode": k.autoscaler.upscaling_mode,
        },
        "storage": {
            "mountPath": k.storage.mount_path,
            "pvc": {
                "claimName": k.storage.pvc_claim_name or "",
                "create": k.storage.create_pvc,
                "name": f"{base_name(cfg)}-storage",  # one volume for every stage's RayJob
                "size": k.storage.pvc_size,
                "storageClassName": k.storage.storage_class_name or "",
            },
        },
        "gcsFaultTolerance": {
            "enabled": gcs.enabled,
            "redisAddress": gcs.redis_address,
            "redisPasswordSecret": _secret(gcs.redis_password_secret),
            "redisUsernameSecret": _secret(gcs.redis_username_secret),
            "externalStorageNamespace": gcs.external_storage_namespace or "",
        },
    }


def _job_values(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The RayJob: the stage runner's command and the job's lifecycle."""
    k = cfg.k8s
    runtime_env: dict[str, Any] = {}
    if cfg.cluster.env_vars:
        runtime_env["env_vars"] = dict(cfg.cluster.env_vars)
    if cfg.cluster.pip:
        runtime_env["pip"] = list(cfg.cluster.pip)
    return {
        "stageRunner": RUNNER_MODULE,
        "stages": [str(s) for s in RUNNABLE_STAGES],
        "job": {
            "stage": str(stage),
            "shutdownAfterJobFinishes": k.job.shutdown_after_finishes,
            "ttlSecondsAfterFinished": k.job.ttl_seconds_after_finished,
            "backoffLimit": k.job.backoff_limit,
            "activeDeadlineSeconds": k.job.active_deadline_seconds or 0,
            "submissionMode": k.job.submission_mode,
            "entrypointNumCpus": cfg.cluster.entrypoint_num_cpus,
            "entrypointNumGpus": cfg.cluster.entrypoint_num_gpus,
            "runtimeEnv": runtime_env,
            **({"deletionStrategy": k.job.deletion_strategy} if k.job.deletion_strategy else {}),
        },
    }


def _endpoint_values(cfg: RunConfig, pod_cfg: RunConfig) -> dict[str, Any]:
    """The RayService: the Serve app, its API-key Secret, upgrades and how clients reach it."""
    k = cfg.k8s
    serve = {key: v for key, v in cfg.serve.model_dump(mode="json").items() if v is not None}
    serve["model_path"] = model_path(pod_cfg)
    up = k.upgrade_strategy
    return {
        "apiKeySecret": {**_secret(k.api_key_secret), "env": cfg.serve.api_keys_env},
        "serve": serve,
        "serveDeployments": app_deployments(cfg.serve),
        "upgradeStrategy": {
            "type": up.type,
            "clusterUpgradeOptions": {
                "maxSurgePercent": up.max_surge_percent,
                "stepSizePercent": up.step_size_percent or 0,
                "intervalSeconds": up.interval_s or 0,
                "gatewayClassName": up.gateway_class_name or "",
            },
        },
        "service": {"type": k.endpoint.service_type, "port": k.endpoint.port},
        "ingress": {
            "enabled": k.endpoint.ingress.enabled,
            "className": k.endpoint.ingress.class_name or "",
            "host": k.endpoint.ingress.host,
            "tlsSecretName": k.endpoint.ingress.tls_secret_name or "",
            "annotations": dict(k.endpoint.ingress.annotations),
        },
        "podMonitor": {
            "enabled": k.pod_monitor.enabled,
            "interval": k.pod_monitor.interval,
            "labels": dict(k.pod_monitor.labels),
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


def check_operator_rules(manifests: str) -> None:
    """RenderError naming every rule the KubeRay operator would reject the rendered Ray object for."""
    for doc in yaml.safe_load_all(manifests):
        if doc and doc.get("apiVersion") == "ray.io/v1":
            errors = operator_errors(doc)
            if errors:
                raise RenderError(
                    f"the KubeRay operator would reject {doc['kind']} {doc['metadata']['name']}:\n  "
                    + "\n  ".join(errors)
                )


def render(cfg: RunConfig, mode: str, stage: str = Stage.PRETRAIN) -> str:
    """Manifests (multi-document YAML) for `mode`, exactly as the chart renders them, checked against the
    operator's runtime rules (the CRD schema alone would let them through to a silent ValidationFailed)."""
    values = chart_values(cfg, mode, stage)
    manifests = helm_template(values, values["nameOverride"], cfg.k8s.namespace)
    check_operator_rules(manifests)
    return manifests
