"""Typed client for KubeRay's RayCluster, RayJob and RayService objects, on the official `kubernetes` package.

Kubernetes reports problems as HTTP statuses inside `ApiException`; callers want to branch on
"already exists", "not there" and "took too long", so those become `ConflictError`, `NotFoundError`
and `WaitTimeoutError`. Status is read into small dataclasses so a CLI or a test asks
`status.finished` instead of knowing which of KubeRay's fields (`jobDeploymentStatus`, conditions,
`state`) means what in v1.7.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

GROUP = "ray.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"


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
        return self.pending is not None or _true(self.conditions, "UpgradeInProgress")

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

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create, or replace an existing object; optimistic, so a concurrent edit raises ConflictError."""
        try:
            return self.create(manifest)
        except ConflictError:
            pass
        current = self.get(kind_of(manifest), manifest["metadata"]["name"])
        return self.replace(
            {**manifest, "metadata": {**manifest["metadata"], **_keep_meta(current["metadata"])}}
        )

    def replace(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Replace an existing object; given `metadata.resourceVersion`, a stale copy raises ConflictError."""
        kind = kind_of(manifest)
        name = manifest["metadata"]["name"]
        return self._call(
            f"replace {kind.kind} {name}",
            self.api.replace_namespaced_custom_object,
            plural=kind.value,
            name=name,
            body=manifest,
            field_validation="Strict",
        )

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

    def wait(
        self,
        kind: Kind,
        name: str,
        timeout_s: float,
        poll_s: float = 2.0,
        on_poll: Callable[[Status], None] | None = None,
    ) -> Status:
        """Poll until a RayCluster/RayService is ready or a RayJob finished; WaitTimeoutError after timeout_s.

        A finished RayJob is returned whether it succeeded or failed: check `status.succeeded`.
        """
        deadline = time.monotonic() + timeout_s
        last: Status | None = None
        while True:
            last = self.status(kind, name)
            if on_poll:
                on_poll(last)
            if last.ready:
                return last
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(f"{kind.kind} {name} not ready after {timeout_s:g}s: {last}", last)
            time.sleep(min(poll_s, remaining))


def _keep_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Server-owned metadata a replace must carry over (resourceVersion makes the update optimistic)."""
    return {k: meta[k] for k in ("resourceVersion", "uid") if k in meta}


# Plain Kubernetes objects the chart renders next to the Ray object: (API class, method suffix, model).
_CORE_KINDS: dict[str, tuple[type, str, str]] = {
    "ConfigMap": (k8s.CoreV1Api, "config_map", "V1ConfigMap"),
    "Service": (k8s.CoreV1Api, "service", "V1Service"),
    "PersistentVolumeClaim": (k8s.CoreV1Api, "persistent_volume_claim", "V1PersistentVolumeClaim"),
    "Ingress": (k8s.NetworkingV1Api, "ingress", "V1Ingress"),
}


class ManifestApplier:
    """Apply or delete a rendered chart (Ray objects via KubeRayClient, the rest via the typed core APIs)."""

    def __init__(self, kuberay: KubeRayClient) -> None:
        self.kuberay = kuberay

    def _core(self, kind: str) -> tuple[Any, str, Any]:
        if kind not in _CORE_KINDS:
            raise ValueError(
                f"cannot apply kind {kind!r}; known: {', '.join([*_CORE_KINDS, *Kind.__members__])}"
            )
        api_cls, suffix, model = _CORE_KINDS[kind]
        return api_cls(self.kuberay.api_client), suffix, getattr(k8s, model)

    def _core_call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(namespace=self.kuberay.namespace, **kwargs)
        except ApiException as exc:
            raise _translate(exc, what) from None

    def apply(self, docs: Iterable[dict[str, Any]]) -> list[str]:
        """Create or replace every document, plain objects first (the Ray pods mount the ConfigMap)."""
        docs = sorted(docs, key=lambda d: d.get("apiVersion") == API_VERSION)
        done = []
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if doc.get("apiVersion") == API_VERSION:
                self.kuberay.apply(doc)
            else:
                self._apply_core(doc)
            done.append(f"{kind}/{name}")
        return done

    def _apply_core(self, doc: dict[str, Any]) -> None:
        kind, name = doc["kind"], doc["metadata"]["name"]
        api, suffix, model = self._core(kind)
        try:
            self._core_call(
                f"create {kind} {name}",
                getattr(api, f"create_namespaced_{suffix}"),
                body=model.from_dict(doc),
            )
            return
        except ConflictError:
            pass
        current = self.kuberay.api_client.sanitize_for_serialization(
            self._core_call(f"read {kind} {name}", getattr(api, f"read_namespaced_{suffix}"), name=name)
        )
        body = {**doc, "metadata": {**doc["metadata"], **_keep_meta(current["metadata"])}}
        if kind == "Service":  # the cluster IP is immutable; a replace must repeat it
            spec = current.get("spec", {})
            body["spec"] = {**doc["spec"], **{k: spec[k] for k in ("clusterIP", "clusterIPs") if k in spec}}
        self._core_call(
            f"replace {kind} {name}",
            getattr(api, f"replace_namespaced_{suffix}"),
            name=name,
            body=model.from_dict(body),
        )

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
                    api, suffix, _ = self._core(kind)
                    self._core_call(
                        f"delete {kind} {name}", getattr(api, f"delete_namespaced_{suffix}"), name=name
                    )
            except NotFoundError:
                continue
            gone.append(f"{kind}/{name}")
        return gone
