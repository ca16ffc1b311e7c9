"""The KubeRay operator's runtime checks (ray-operator/controllers/ray/utils/validation.go, v1.7.0).

The CRD schema only checks shapes. The operator validates the rest when it reconciles, long after
`kubectl apply` said "created": a RayJob goes to `ValidationFailed`, a RayService gets a `Ready=False,
ValidationFailed` condition, a RayCluster only a Warning event, and a waiting client sees nothing but a
timeout. `operator_errors` runs the rules that the manifest alone decides before anything is sent, so
`raylm k8s render` fails with the operator's own reason. Rules that depend on operator feature gates are
checked only for what raylm can render. Each message starts with the field path it is about.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # utils/constant.go
DELETION_ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")  # TTLs must not decrease along it


def _version(text: str) -> tuple[int, ...] | None:
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(p or 0) for p in m.groups()) if m else None


def _autoscaling(spec: dict[str, Any]) -> bool:
    return bool(spec.get("enableInTreeAutoscaling"))


def _autoscaler_v2(spec: dict[str, Any]) -> bool:
    return _autoscaling(spec) and (spec.get("autoscalerOptions") or {}).get("version") == "v2"


def _head_env(spec: dict[str, Any]) -> dict[str, Any]:
    containers = spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    return {e.get("name"): e for e in containers[0].get("env") or []}


def cluster_spec_errors(spec: dict[str, Any], path: str = "spec") -> list[str]:
    """ValidateRayClusterSpec: worker group bounds, autoscaler v2 rules, GCS FT, token auth version."""
    errors: list[str] = []
    auto = _autoscaling(spec)
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        where, name = f"{path}.workerGroupSpecs[{i}]", g.get("groupName", "")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not auto and (lo is None or hi is None):
            errors.append(f"{where}: worker group {name} needs min/maxReplicas without autoscaling")
        if lo is not None and lo < 0 or hi is not None and hi < 0:
            errors.append(f"{where}: worker group {name} has negative minReplicas/maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{where}: worker group {name} has minReplicas {lo} greater than maxReplicas {hi}")
        if g.get("idleTimeoutSeconds") is not None and not _autoscaler_v2(spec):
            errors.append(
                f"{where}.idleTimeoutSeconds: set, but autoscaler v2 is not enabled "
                "(set autoscalerOptions.version: v2 with enableInTreeAutoscaling)"
            )
        if "labels" in (g.get("rayStartParams") or {}):
            errors.append(f"{where}.rayStartParams: 'labels' is not supported; use the group's labels field")
        if g.get("suspend") and auto:
            errors.append(f"{where}.suspend: worker group {name} cannot be suspended with the autoscaler on")
    head_params = spec.get("headGroupSpec", {}).get("rayStartParams") or {}
    gcs = spec.get("gcsFaultToleranceOptions")
    if gcs is not None and head_params.get("redis-password"):
        errors.append(f"{path}.headGroupSpec.rayStartParams: redis-password belongs in GCS FT options")
    if head_params.get("redis-username") or "REDIS_USERNAME" in _head_env(spec):
        errors.append(f"{path}.headGroupSpec: a redis username belongs in gcsFaultToleranceOptions")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = _version(spec.get("rayVersion", ""))
        if version is None or version < (2, 52, 0):
            errors.append(
                f"{path}.authOptions.mode: 'token' needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}"
            )
    elif auth.get("enableK8sTokenAuth"):
        errors.append(f"{path}.authOptions.enableK8sTokenAuth: needs authOptions.mode 'token'")
    return errors


def _deletion_errors(spec: dict[str, Any]) -> list[str]:
    """validateDeletionConfiguration: TTL only with shutdown, and the deletionStrategy rules."""
    errors: list[str] = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
    ds = spec.get("deletionStrategy")
    if ds is None:
        return errors
    legacy = "onSuccess" in ds or "onFailure" in ds
    rules = ds.get("deletionRules") or []
    if rules and shutdown:
        errors.append("spec.deletionStrategy.deletionRules: mutually exclusive with shutdownAfterJobFinishes")
    if rules and legacy:
        errors.append("spec.deletionStrategy: use either onSuccess/onFailure or deletionRules, not both")
    if legacy:
        on_success, on_failure = ds.get("onSuccess") or {}, ds.get("onFailure") or {}
        if not on_success.get("policy") or not on_failure.get("policy"):
            errors.append("spec.deletionStrategy: onSuccess.policy and onFailure.policy must both be set")
        policies = {on_success.get("policy"), on_failure.get("policy")}
        if "DeleteWorkers" in policies and _autoscaling(spec.get("rayClusterSpec") or {}):
            errors.append("spec.deletionStrategy: DeleteWorkers does not support autoscaling")
        if shutdown and "DeleteNone" in policies:
            errors.append("spec.deletionStrategy: DeleteNone contradicts shutdownAfterJobFinishes: true")
    elif rules:
        errors += _deletion_rule_errors(rules, _autoscaling(spec.get("rayClusterSpec") or {}))
    else:
        errors.append("spec.deletionStrategy: needs both onSuccess and onFailure, or deletionRules")
    return errors


def _deletion_rule_errors(rules: list[dict[str, Any]], autoscaling: bool) -> list[str]:
    errors: list[str] = []
    seen: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        where, cond = f"spec.deletionStrategy.deletionRules[{i}]", rule.get("condition") or {}
        keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in cond]
        if len(keys) != 1:
            errors.append(f"{where}.condition: set exactly one of jobStatus and jobDeploymentStatus")
            continue
        if cond.get("ttlSeconds", 0) < 0:
            errors.append(f"{where}.condition.ttlSeconds: must be non-negative")
            continue
        policy = rule.get("policy", "")
        if policy == "DeleteWorkers" and autoscaling:
            errors.append(f"{where}.policy: DeleteWorkers is not supported with autoscaling")
            continue
        ttls = seen.setdefault((keys[0], cond[keys[0]]), {})
        if policy in ttls:
            errors.append(f"{where}: duplicate rule for {policy} and {keys[0]} {cond[keys[0]]}")
            continue
        ttls[policy] = cond.get("ttlSeconds", 0)
    for (key, value), ttls in seen.items():
        ordered = [(p, ttls[p]) for p in DELETION_ORDER if p in ttls]
        for (p1, t1), (p2, t2) in zip(ordered, ordered[1:], strict=False):
            if t2 < t1:
                errors.append(f"spec.deletionStrategy: {key} {value}: {p2} TTL {t2} must be >= {p1} TTL {t1}")
    return errors


def rayjob_errors(obj: dict[str, Any]) -> list[str]:
    """ValidateRayJobSpec."""
    spec = obj.get("spec") or {}
    errors: list[str] = []
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        errors.append("spec.suspend: a RayJob with shutdownAfterJobFinishes: false cannot be suspended")
    errors += _deletion_errors(spec)
    if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
        errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if mode == "InteractiveMode" and backoff:
        errors.append("spec.backoffLimit: incompatible with InteractiveMode")
    if mode == "SidecarMode":
        for key in ("submitterPodTemplate", "submitterConfig"):
            if key in spec:
                errors.append(f"spec.{key}: not supported with submissionMode SidecarMode")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as exc:
        errors.append(f"spec.runtimeEnvYAML: not valid YAML ({exc.__class__.__name__})")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            errors.append(f"spec.{key}: must be a positive integer")
    if backoff is not None and backoff < 0:
        errors.append("spec.backoffLimit: must not be negative")
    if spec.get("rayClusterSpec") is not None:
        errors += cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
    return errors


def rayservice_errors(obj: dict[str, Any]) -> list[str]:
    """ValidateRayServiceSpec, plus the serveConfigV2 parse the controller does before deploying."""
    spec = obj.get("spec") or {}
    cluster = spec.get("rayClusterConfig") or {}
    errors = cluster_spec_errors(cluster, "spec.rayClusterConfig")
    try:
        serve = yaml.safe_load(spec.get("serveConfigV2") or "")
        if serve is not None and not isinstance(serve, dict):
            errors.append("spec.serveConfigV2: must be a YAML mapping (Serve's config file)")
    except yaml.YAMLError as exc:
        errors.append(f"spec.serveConfigV2: not valid YAML ({exc.__class__.__name__})")
    if (cluster.get("headGroupSpec", {}).get("headService") or {}).get("metadata", {}).get("name"):
        errors.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        errors.append("spec.rayClusterDeletionDelaySeconds: must be non-negative")
    upgrade = spec.get("upgradeStrategy") or {}
    kind = upgrade.get("type")
    if kind not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
        allowed = "NewCluster, NewClusterWithIncrementalUpgrade, None"
        errors.append(f"spec.upgradeStrategy.type: {kind!r}; allowed: {allowed}")
    if kind == "NewClusterWithIncrementalUpgrade":
        errors += _incremental_errors(upgrade.get("clusterUpgradeOptions"), _autoscaling(cluster))
    return errors


def _incremental_errors(options: dict[str, Any] | None, autoscaling: bool) -> list[str]:
    where = "spec.upgradeStrategy.clusterUpgradeOptions"
    if not autoscaling:
        return ["spec.upgradeStrategy: NewClusterWithIncrementalUpgrade needs the Ray autoscaler"]
    if options is None:
        return [f"{where}: required for NewClusterWithIncrementalUpgrade"]
    surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent")
    errors = []
    if not 0 <= surge <= 100:
        errors.append(f"{where}.maxSurgePercent: must be between 0 and 100")
    if step is None or not 0 <= step <= 100:
        errors.append(f"{where}.stepSizePercent: must be between 0 and 100")
    elif step > surge:
        errors.append(f"{where}.stepSizePercent: must be <= maxSurgePercent")
    if not options.get("intervalSeconds") or options["intervalSeconds"] <= 0:
        errors.append(f"{where}.intervalSeconds: must be greater than 0")
    if not options.get("gatewayClassName"):
        errors.append(f"{where}.gatewayClassName: required for NewClusterWithIncrementalUpgrade")
    return errors


def operator_errors(obj: dict[str, Any]) -> list[str]:
    """Every rule the KubeRay operator would reject `obj` for at reconcile time (empty list = accepted)."""
    kind = obj.get("kind", "")
    name = (obj.get("metadata") or {}).get("name", "")
    errors = []
    if kind in MAX_NAME:
        if len(name) > MAX_NAME[kind]:
            errors.append(f"metadata.name: {kind} name {name!r} is longer than {MAX_NAME[kind]} characters")
        if not DNS1035.match(name):
            errors.append(f"metadata.name: {kind} name {name!r} must be a DNS-1035 label")
    if kind == "RayCluster":
        errors += cluster_spec_errors(obj.get("spec") or {})
        if (obj.get("spec") or {}).get("upgradeStrategy", {}).get("type") not in (None, "Recreate", "None"):
            errors.append("spec.upgradeStrategy.type: allowed: Recreate, None")
    elif kind == "RayJob":
        errors += rayjob_errors(obj)
    elif kind == "RayService":
        errors += rayservice_errors(obj)
    return errors
