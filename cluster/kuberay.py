"""Typed client for KubeRay's RayCluster, RayJob and RayService objects, on the official `kubernetes` package.

Kubernetes reports problems as HTTP statuses inside `ApiException`; callers want to branch on
"already exists", "not there" and "took too long", so those become `ConflictError`, `NotFoundError`
and `WaitTimeoutError`. Status is read into small dataclasses so a CLI or a test asks
`status.finished` instead of knowing which of KubeRay's fields (`jobDeploymentStatus`, conditions,
`state`) means what in v1.7.

Objects are written with server-side apply (field manager `raylm`): the API server merges the fields
raylm owns and refuses (409) to overwrite fields another manager set, so a re-apply keeps the replicas
the autoscaler chose, a bound PVC's immutable spec is left alone, and only `force` takes fields over.
Day-2 edits (scale, suspend) are merge patches under their own manager, `raylm-cli`.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

GROUP = "ray.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "raylm"  # owner of what `raylm k8s apply` writes
CLI_MANAGER = "raylm-cli"  # owner of day-2 edits (scale, suspend), so a re-apply sees them as someone else's
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
TOKEN_KEY = "auth_token"  # key of KubeRay's token Secret (utils.RAY_AUTH_TOKEN_SECRET_KEY)


class Kind(StrEnum):
    """The three KubeRay kinds; the value is the REST plural."""

    RAY_CLUSTER = "rayclusters"
    RAY_JOB = "rayjobs"
    RAY_SERVICE = "rayservices"

    @property
    def kind(self) -> str:
        return {"rayclusters": "RayCluster", "rayjobs": "RayJob", "rayservices": "RayService"}[self.value]

    @classmethod
    def parse(cls, text: str) -> Kind:
        """Accept `RayJob`, `rayjob`, `rayjobs` and the like."""
        wanted = text.lower().rstrip("s")
        for k in cls:
            if wanted in (k.kind.lower(), k.value.rstrip("s")):
                return k
        raise ValueError(f"unknown kind {text!r}; allowed: {', '.join(k.kind for k in cls)}")


class KubeRayError(RuntimeError):
    """An API call failed; `status` is the HTTP status (0 when no response)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ConflictError(KubeRayError):
    """409: the object already exists, or it changed since it was read."""


class NotFoundError(KubeRayError):
    """404: no such object (or the KubeRay CRDs are not installed)."""


class InvalidError(KubeRayError):
    """422: the API server rejected the object against the CRD schema."""


class OperatorRejectedError(KubeRayError):
    """The KubeRay operator refused the spec when reconciling (ValidationFailed status, Warning event)."""


class JobAlreadyFinishedError(KubeRayError):
    """A RayJob with this exact config already ran; KubeRay never runs a RayJob twice."""


class WaitTimeoutError(KubeRayError, TimeoutError):
    """`wait` gave up; `last` holds the last status seen."""

    def __init__(self, message: str, last: Any = None) -> None:
        super().__init__(message)
        self.last = last


def _translate(exc: ApiException, what: str) -> KubeRayError:
    reason = exc.reason or ""
    with contextlib.suppress(TypeError, ValueError, AttributeError):  # body is a k8s Status, if anything
        reason = json.loads(exc.body).get("message", reason)
    cls = {409: ConflictError, 404: NotFoundError, 422: InvalidError}.get(exc.status or 0, KubeRayError)
    if exc.status == 409 and "conflict" in reason.lower() and "apply" in what:
        reason += " (another field manager changed these fields; re-run with --force to take them over)"
    return cls(f"{what}: {exc.status} {reason}", exc.status or 0)


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str = ""
    message: str = ""


def _conditions(status: dict[str, Any]) -> list[Condition]:
    return [
        Condition(c.get("type", ""), c.get("status", ""), c.get("reason", ""), c.get("message", ""))
        for c in status.get("conditions") or []
    ]


def _true(conditions: Iterable[Condition], type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in conditions)


@dataclass(frozen=True)
class RayClusterStatus:
    name: str
    state: str
    ready_workers: int
    desired_workers: int
    head_ip: str | None
    conditions: list[Condition] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        # v1.7 sets state=ready once the head pod is ready and all min workers are up.
        return (
            self.state == "ready"
            or _true(self.conditions, "HeadPodReady")
            and _true(self.conditions, "RayClusterProvisioned")
        )

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> RayClusterStatus:
        st = obj.get("status") or {}
        return cls(
            name=obj["metadata"]["name"],
            state=st.get("state", ""),
            ready_workers=int(st.get("readyWorkerReplicas", 0)),
            desired_workers=int(st.get("desiredWorkerReplicas", 0)),
            head_ip=(st.get("head") or {}).get("podIP"),
            conditions=_conditions(st),
        )


JOB_TERMINAL = ("Complete", "Failed", "ValidationFailed")
JOB_STARTED = ("Running", *JOB_TERMINAL)  # deployment statuses at or past the job actually running


@dataclass(frozen=True)
class RayJobStatus:
    name: str
    deployment_status: str
    job_status: str
    message: str
    cluster_name: str
    dashboard_url: str
    failed_attempts: int

    @property
    def finished(self) -> bool:
        return self.deployment_status in JOB_TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.deployment_status == "Complete" and self.job_status == "SUCCEEDED"

    @property
    def running(self) -> bool:
        """The job was submitted to its cluster and runs now, or ran already (a finished job has run)."""
        return self.deployment_status in JOB_STARTED

    @property
    def rejected(self) -> str | None:
        """The operator's reason when it refused the spec (ValidationFailed), else None."""
        if self.deployment_status != "ValidationFailed":
            return None
        return self.message or "ValidationFailed"

    @property
    def ready(self) -> bool:
        return self.finished

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> RayJobStatus:
        st = obj.get("status") or {}
        return cls(
            name=obj["metadata"]["name"],
            deployment_status=st.get("jobDeploymentStatus", ""),
            job_status=st.get("jobStatus", ""),
            message=st.get("message", ""),
            cluster_name=st.get("rayClusterName", ""),
            dashboard_url=st.get("dashboardURL", ""),
            failed_attempts=int(st.get("failed", 0)),
        )


@dataclass(frozen=True)
class ServeAppStatus:
    status: str
    message: str
    deployments: dict[str, str]

    @property
    def healthy(self) -> bool:
        return self.status == "RUNNING" and all(s == "HEALTHY" for s in self.deployments.values())


@dataclass(frozen=True)
class ServeClusterStatus:
    """One side of a RayService: the active cluster taking traffic, or the pending one being upgraded to."""

    cluster_name: str
    applications: dict[str, ServeAppStatus]

    @property
    def healthy(self) -> bool:
        return bool(self.applications) and all(a.healthy for a in self.applications.values())

    @classmethod
    def parse(cls, st: dict[str, Any] | None) -> ServeClusterStatus | None:
        if not st or not st.get("rayClusterName"):
            return None
        apps = {
            name: ServeAppStatus(
                status=a.get("status", ""),
                message=a.get("message", ""),
                deployments={
                    d: s.get("status", "") for d, s in (a.get("serveDeploymentStatuses") or {}).items()
                },
            )
            for name, a in (st.get("applicationStatuses") or {}).items()
        }
        return cls(cluster_name=st["rayClusterName"], applications=apps)


@dataclass(frozen=True)
class RayServiceStatus:
    name: str
    active: ServeClusterStatus | None
    pending: ServeClusterStatus | None
    num_serve_endpoints: int
    conditions: list[Condition] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Ready condition set by KubeRay, and every application on the active cluster healthy."""
        return _true(self.conditions, "Ready") and self.active is not None and self.active.healthy

    @property
    def upgrading(self) -> bool:
        """A new cluster is being brought up, or KubeRay is rolling an upgrade back to the old one."""
        return self.pending is not None or self.rolling_back or _true(self.conditions, "UpgradeInProgress")

    @property
    def rolling_back(self) -> bool:
        return _true(self.conditions, "RollbackInProgress")

    @property
    def rejected(self) -> str | None:
        """The operator's reason when it refused the spec (Ready=False/ValidationFailed), else None."""
        for c in self.conditions:
            if c.type == "Ready" and c.status == "False" and c.reason == "ValidationFailed":
                return c.message or c.reason
        return None

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> RayServiceStatus:
        st = obj.get("status") or {}
        return cls(
            name=obj["metadata"]["name"],
            active=ServeClusterStatus.parse(st.get("activeServiceStatus")),
            pending=ServeClusterStatus.parse(st.get("pendingServiceStatus")),
            num_serve_endpoints=int(st.get("numServeEndpoints", 0)),
            conditions=_conditions(st),
        )


Status = RayClusterStatus | RayJobStatus | RayServiceStatus
_PARSERS: dict[Kind, Callable[[dict[str, Any]], Status]] = {
    Kind.RAY_CLUSTER: RayClusterStatus.parse,
    Kind.RAY_JOB: RayJobStatus.parse,
    Kind.RAY_SERVICE: RayServiceStatus.parse,
}


def kind_of(manifest: dict[str, Any]) -> Kind:
    if manifest.get("apiVersion") != API_VERSION:
        raise ValueError(f"apiVersion must be {API_VERSION}, got {manifest.get('apiVersion')!r}")
    return Kind.parse(str(manifest.get("kind", "")))


class KubeRayClient:
    """RayCluster / RayJob / RayService in one namespace through the custom-objects API."""

    def __init__(self, api_client: k8s.ApiClient | None = None, namespace: str = "default") -> None:
        self.api_client = api_client or k8s.ApiClient()
        self.api = k8s.CustomObjectsApi(self.api_client)
        self.namespace = namespace

    @classmethod
    def from_kubeconfig(
        cls, namespace: str = "default", kubeconfig: str | None = None, context: str | None = None
    ) -> KubeRayClient:
        """Use the kubeconfig (or the pod's service account when running inside a cluster)."""
        try:
            k8s_config.load_kube_config(config_file=kubeconfig, context=context)
        except k8s_config.ConfigException:
            if kubeconfig:
                raise
            k8s_config.load_incluster_config()
        return cls(k8s.ApiClient(), namespace)

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(group=GROUP, version=VERSION, namespace=self.namespace, **kwargs)
        except ApiException as exc:
            raise _translate(exc, what) from None

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the object; ConflictError if it exists."""
        kind = kind_of(manifest)
        name = manifest["metadata"]["name"]
        return self._call(
            f"create {kind.kind} {name}",
            self.api.create_namespaced_custom_object,
            plural=kind.value,
            body=manifest,
            field_validation="Strict",  # reject unknown fields instead of silently dropping them
        )

    def apply(self, manifest: dict[str, Any], force: bool = False) -> dict[str, Any]:
        """Server-side apply as field manager `raylm`: create, or merge into what is there.

        ConflictError when another manager owns a field this apply would change (unless `force`);
        JobAlreadyFinishedError when the same RayJob already ran, since KubeRay would only report the
        old result again.
        """
        kind = kind_of(manifest)
        name = manifest["metadata"]["name"]
        try:
            live = self.get(kind, name)
        except NotFoundError:
            live = None
        if live is not None and kind is Kind.RAY_JOB:
            done = RayJobStatus.parse(live)
            if done.finished:
                raise JobAlreadyFinishedError(
                    f"RayJob {name} already ran with this exact config and finished as "
                    f"{done.deployment_status}/{done.job_status or '-'}; change the config for a new run, "
                    "or delete it (raylm k8s delete) to run it again",
                    409,
                )
        if live is not None and kind is Kind.RAY_CLUSTER:
            manifest = keep_scaling_state(manifest, live)
        out = self._call(
            f"apply {kind.kind} {name}",
            self.api.patch_namespaced_custom_object,
            plural=kind.value,
            name=name,
            body=manifest,
            field_manager=FIELD_MANAGER,
            field_validation="Strict",
            force=True if force else None,
            _content_type=APPLY_PATCH,
        )
        # An apply that creates answers 201, which the generated client maps to no body at all.
        return out if out is not None else self.get(kind, name)

    def patch(self, kind: Kind, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch (RFC 7386) as field manager `raylm-cli`; a `metadata.resourceVersion` in
        `patch` makes it optimistic (ConflictError when the object changed since it was read)."""
        return self._call(
            f"patch {kind.kind} {name}",
            self.api.patch_namespaced_custom_object,
            plural=kind.value,
            name=name,
            body=patch,
            field_manager=CLI_MANAGER,
            _content_type=MERGE_PATCH,
        )

    def scale(
        self,
        cluster: str,
        group: str,
        replicas: int | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
    ) -> dict[str, Any]:
        """Set a RayCluster worker group's replicas / minReplicas / maxReplicas (None = unchanged).

        Lists in a CRD are replaced whole by a merge patch, so the patch carries every group as read,
        with the read resourceVersion: a concurrent change (the autoscaler's) fails instead of being lost.
        """
        live = self.get(Kind.RAY_CLUSTER, cluster)
        groups = copy.deepcopy(live["spec"].get("workerGroupSpecs") or [])
        target = next((g for g in groups if g.get("groupName") == group), None)
        if target is None:
            known = ", ".join(g.get("groupName", "") for g in groups) or "none"
            raise NotFoundError(f"RayCluster {cluster} has no worker group {group!r}; groups: {known}", 404)
        for key, value in (
            ("replicas", replicas),
            ("minReplicas", min_replicas),
            ("maxReplicas", max_replicas),
        ):
            if value is not None:
                target[key] = value
        n = target.get("replicas", 0)
        lo, hi = target.get("minReplicas", 0), target.get("maxReplicas", n)
        if not lo <= n <= hi:
            raise InvalidError(
                f"worker group {group}: need minReplicas <= replicas <= maxReplicas, got {lo}/{n}/{hi}", 422
            )
        body = {
            "metadata": {"resourceVersion": live["metadata"]["resourceVersion"]},
            "spec": {"workerGroupSpecs": groups},
        }
        return self.patch(Kind.RAY_CLUSTER, cluster, body)

    def suspend(self, name: str, suspended: bool = True) -> dict[str, Any]:
        """Suspend a RayJob (KubeRay deletes its cluster and keeps the RayJob) or resume it (`False`)."""
        live = self.get(Kind.RAY_JOB, name)
        if suspended and not live["spec"].get("shutdownAfterJobFinishes"):
            raise InvalidError(
                f"RayJob {name}: KubeRay cannot suspend a RayJob with shutdownAfterJobFinishes: false", 422
            )
        return self.patch(Kind.RAY_JOB, name, {"spec": {"suspend": suspended}})

    def resume(self, name: str) -> dict[str, Any]:
        return self.suspend(name, suspended=False)

    def get(self, kind: Kind, name: str) -> dict[str, Any]:
        return self._call(
            f"get {kind.kind} {name}", self.api.get_namespaced_custom_object, plural=kind.value, name=name
        )

    def list(self, kind: Kind, label_selector: str = "") -> list[dict[str, Any]]:
        out = self._call(
            f"list {kind.kind}",
            self.api.list_namespaced_custom_object,
            plural=kind.value,
            label_selector=label_selector,
        )
        return list(out.get("items", []))

    def status(self, kind: Kind, name: str) -> Status:
        return _PARSERS[kind](self.get(kind, name))

    def delete(self, kind: Kind, name: str) -> None:
        """Delete with foreground propagation so the Ray pods go with the object."""
        self._call(
            f"delete {kind.kind} {name}",
            self.api.delete_namespaced_custom_object,
            plural=kind.value,
            name=name,
            body=k8s.V1DeleteOptions(propagation_policy="Foreground"),
        )

    def rejection(self, kind: Kind, status: Status) -> str | None:
        """Why the operator refused the spec, if it did: from the status (RayJob, RayService) or, for a
        RayCluster, which only gets a Warning event, from the events of the object."""
        if not isinstance(status, RayClusterStatus):
            return status.rejected
        try:
            events = k8s.CoreV1Api(self.api_client).list_namespaced_event(
                self.namespace,
                field_selector=f"involvedObject.kind=RayCluster,involvedObject.name={status.name}",
            )
        except ApiException as exc:
            raise _translate(exc, f"list events of RayCluster {status.name}") from None
        for event in events.items or []:
            if event.type == "Warning" and (event.reason or "").startswith("InvalidRayCluster"):
                return event.message or event.reason
        return None

    def wait(
        self,
        kind: Kind,
        name: str,
        timeout_s: float,
        poll_s: float = 2.0,
        on_poll: Callable[[Status], None] | None = None,
        until: str = "ready",
    ) -> Status:
        """Poll until a RayCluster/RayService is ready or a RayJob finished (`until="running"`: until the
        RayJob runs); WaitTimeoutError after timeout_s, OperatorRejectedError as soon as KubeRay refuses
        the spec (instead of a timeout much later).

        A finished RayJob is returned whether it succeeded or failed: check `status.succeeded`.
        """
        if until not in ("ready", "running") or (until == "running" and kind is not Kind.RAY_JOB):
            raise ValueError(f"until: got {until!r}; allowed: 'ready', and 'running' for a RayJob")
        deadline = time.monotonic() + timeout_s
        last: Status | None = None
        while True:
            last = self.status(kind, name)
            if on_poll:
                on_poll(last)
            reached = last.running if until == "running" else last.ready  # type: ignore[union-attr]
            # a rejected RayJob counts as finished; a RayCluster's events are only worth a call while waiting
            reason = self.rejection(kind, last) if not (reached and kind is Kind.RAY_CLUSTER) else None
            if reason:
                raise OperatorRejectedError(f"KubeRay rejected {kind.kind} {name}: {reason}", 422)
            if reached:
                return last
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(f"{kind.kind} {name} not {until} after {timeout_s:g}s: {last}", last)
            time.sleep(min(poll_s, remaining))

    def cluster_name(self, kind: Kind, name: str) -> str:
        """The RayCluster behind a RayCluster / RayJob / RayService (the active one for a RayService)."""
        if kind is Kind.RAY_CLUSTER:
            return name
        status = self.status(kind, name)
        cluster = (
            status.cluster_name
            if isinstance(status, RayJobStatus)
            else (status.active or status.pending).cluster_name  # type: ignore[union-attr]
            if isinstance(status, RayServiceStatus) and (status.active or status.pending)
            else ""
        )
        if not cluster:
            raise NotFoundError(f"{kind.kind} {name} has no RayCluster yet; wait for it", 404)
        return cluster

    def ray_token(self, kind: Kind, name: str) -> str | None:
        """The Ray auth token of the object's cluster from the Secret KubeRay made (or `secretName`);
        None when the cluster runs without token auth."""
        obj = self.get(kind, name)
        spec = obj.get("spec") or {}
        auth = (spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec).get("authOptions") or {}
        if auth.get("mode") != "token":
            return None
        secret = auth.get("secretName") or check_name(self.cluster_name(kind, name))
        try:
            data = k8s.CoreV1Api(self.api_client).read_namespaced_secret(secret, self.namespace).data or {}
        except ApiException as exc:
            raise _translate(exc, f"read token Secret {secret}") from None
        if TOKEN_KEY not in data:
            raise NotFoundError(f"Secret {secret} has no key {TOKEN_KEY}", 404)
        return base64.b64decode(data[TOKEN_KEY]).decode().strip()


def check_name(name: str) -> str:
    """KubeRay's utils.CheckName: the name it gives objects derived from a RayCluster name."""
    if len(name) > 50:
        name = name[len(name) - 50 :]
    if name[:1].isdigit() or (name[:1] and not name[:1].isalnum()):
        name = "r" + name[1:]
    return name


def keep_scaling_state(manifest: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Carry over what the autoscaler owns into a RayCluster about to be re-applied.

    `workerGroupSpecs` is an atomic list in the CRD, so an apply replaces it whole: without this, a
    re-apply would reset `replicas` to the config's initial count and drop `scaleStrategy.workersToDelete`.
    """
    if not manifest["spec"].get("enableInTreeAutoscaling"):
        return manifest
    out = copy.deepcopy(manifest)
    live_groups = {g.get("groupName"): g for g in live.get("spec", {}).get("workerGroupSpecs") or []}
    for group in out["spec"].get("workerGroupSpecs") or []:
        current = live_groups.get(group.get("groupName"))
        if current is None:
            continue
        if "replicas" in current:
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", current["replicas"])
            group["replicas"] = min(max(current["replicas"], lo), hi)
        if current.get("scaleStrategy"):
            group["scaleStrategy"] = current["scaleStrategy"]
    return out


HEAD_SERVICE = re.compile(
    r"^(?P<name>[a-z][-a-z0-9]*?)-head-svc(?:\.(?P<namespace>[a-z0-9][-a-z0-9]*))?(?:\.svc(?:\.[-a-z0-9.]+)?)?$"
)


def token_for_address(address: str) -> Any:
    """The token for a dashboard at a KubeRay head Service (`<cluster>-head-svc[.<namespace>]`), read from
    KubeRay's Secret with the local kubeconfig; None for other addresses or without Kubernetes access.

    Returns `cluster.auth.Token` (imported lazily: auth calls this as its last resort).
    """
    from urllib.parse import urlparse

    from cluster.auth import Token

    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    m = HEAD_SERVICE.match(host)
    if not m:
        return None
    config_file = os.environ.get("KUBECONFIG") or None  # read now: the package reads it once, at import
    try:
        k8s_config.load_kube_config(config_file=config_file)
        namespace = m["namespace"] or k8s_config.list_kube_config_contexts(config_file)[1]["context"].get(
            "namespace"
        )
    except (k8s_config.ConfigException, OSError, TypeError, KeyError):
        return None
    client = KubeRayClient(k8s.ApiClient(), namespace or "default")
    for kind in (Kind.RAY_CLUSTER, Kind.RAY_SERVICE):  # a RayService has a head Service of its own name
        try:
            value = client.ray_token(kind, m["name"])
        except NotFoundError:
            continue
        except (KubeRayError, urllib3.exceptions.HTTPError):
            return None  # no access to the Secret: the caller explains which token sources it tried
        return (
            Token(value, f"KubeRay Secret of {kind.kind} {client.namespace}/{m['name']}") if value else None
        )
    return None


# Plain Kubernetes objects the chart renders next to the Ray object: (API class, method suffix).
_CORE_KINDS: dict[str, tuple[type, str]] = {
    "ConfigMap": (k8s.CoreV1Api, "config_map"),
    "Service": (k8s.CoreV1Api, "service"),
    "ServiceAccount": (k8s.CoreV1Api, "service_account"),
    "PersistentVolumeClaim": (k8s.CoreV1Api, "persistent_volume_claim"),
    "Ingress": (k8s.NetworkingV1Api, "ingress"),
    "NetworkPolicy": (k8s.NetworkingV1Api, "network_policy"),
}
# Other operators' custom resources the chart may render: kind -> (group, version, plural).
_CUSTOM_KINDS: dict[str, tuple[str, str, str]] = {
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors")
}


class ManifestApplier:
    """Apply or delete a rendered chart (Ray objects via KubeRayClient, the rest via the typed core APIs),
    every object with server-side apply as field manager `raylm`."""

    def __init__(self, kuberay: KubeRayClient, force: bool = False) -> None:
        self.kuberay = kuberay
        self.force = force

    def _core(self, kind: str) -> tuple[Any, str]:
        if kind not in _CORE_KINDS:
            known = ", ".join([*_CORE_KINDS, *_CUSTOM_KINDS, *(k.kind for k in Kind)])
            raise ValueError(f"cannot apply kind {kind!r}; known: {known}")
        api_cls, suffix = _CORE_KINDS[kind]
        return api_cls(self.kuberay.api_client), suffix

    def _other_call(self, what: str, kind: str, verb: str, **kwargs: Any) -> Any:
        """`verb` (patch / delete) on a non-Ray object: typed core API or custom-objects API."""
        try:
            if kind in _CUSTOM_KINDS:
                group, version, plural = _CUSTOM_KINDS[kind]
                fn = getattr(self.kuberay.api, f"{verb}_namespaced_custom_object")
                return fn(
                    group=group, version=version, namespace=self.kuberay.namespace, plural=plural, **kwargs
                )
            api, suffix = self._core(kind)
            return getattr(api, f"{verb}_namespaced_{suffix}")(namespace=self.kuberay.namespace, **kwargs)
        except ApiException as exc:
            raise _translate(exc, what) from None

    def apply(self, docs: Iterable[dict[str, Any]]) -> list[str]:
        """Apply every document, plain objects first (the Ray pods mount the ConfigMap, use the account)."""
        docs = sorted(docs, key=lambda d: d.get("apiVersion") == API_VERSION)
        done = []
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if doc.get("apiVersion") == API_VERSION:
                self.kuberay.apply(doc, force=self.force)
            else:
                self._other_call(
                    f"apply {kind} {name}",
                    kind,
                    "patch",
                    name=name,
                    body=doc,
                    field_manager=FIELD_MANAGER,
                    force=True if self.force else None,
                    _content_type=APPLY_PATCH,
                )
            done.append(f"{kind}/{name}")
        return done

    def delete(
        self, docs: Iterable[dict[str, Any]], keep_kinds: tuple[str, ...] = ("PersistentVolumeClaim",)
    ) -> list[str]:
        """Delete what the chart rendered, Ray objects first; absent objects are skipped, PVCs kept."""
        docs = sorted(docs, key=lambda d: d.get("apiVersion") != API_VERSION)
        gone = []
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind in keep_kinds:
                continue
            try:
                if doc.get("apiVersion") == API_VERSION:
                    self.kuberay.delete(Kind.parse(kind), name)
                else:
                    self._other_call(f"delete {kind} {name}", kind, "delete", name=name)
            except NotFoundError:
                continue
            gone.append(f"{kind}/{name}")
        return gone
