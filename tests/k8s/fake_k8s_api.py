"""A FAKE Kubernetes API server, in-process, for testing the KubeRay client without a cluster.

It implements the REST routes the client uses (custom objects under ray.io/v1 and PodMonitors, plus
ConfigMaps, Services, ServiceAccounts, Secrets, PVCs, Ingresses, NetworkPolicies and Events), answers
with real Kubernetes `Status` errors (404, 409, 422), keeps `resourceVersion` for optimistic writes,
rejects Ray objects that break the KubeRay v1.7.0 CRD schemas, and keeps a PVC's spec immutable
(except its storage request).

Server-side apply (PATCH, `application/apply-patch+yaml`) follows the API server's rules as far as the
client relies on them: every manager's fields are recorded in `metadata.managedFields` (FieldsV1);
maps merge field by field while lists are atomic (the KubeRay CRDs declare no list-map keys); an
apply that changes a field another manager owns fails with 409 unless `force=true`, which moves the
field over; fields a manager stops applying are removed unless someone else owns them. Merge patches
(RFC 7386) and PUTs are "Update" operations that take over the fields they change.

It also plays the KubeRay operator: every read of a Ray object advances its status one step
(RayCluster -> ready, RayJob -> Running -> Complete, RayService -> pending cluster -> active and
healthy), creates the token Secret of a cluster with `authOptions.mode: token`, and refuses specs the
way the operator does at runtime (a few rules restated here, independently of cluster/kuberay_rules.py):
RayJob -> ValidationFailed, RayService -> Ready=False/ValidationFailed, RayCluster -> Warning event.
Names in `stuck` never advance (for timeout tests); names in `fail_jobs` end as Failed; names in
`rolling_back` show a RayService rolling an upgrade back. Statuses it writes are validated against the
CRD status schema too.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

from tests.k8s.crd_schema import crd_errors

RAY_PLURALS = {"rayclusters": "RayCluster", "rayjobs": "RayJob", "rayservices": "RayService"}
CORE_PLURALS = {  # plural -> (kind, API group; "" = the core group under /api/v1)
    "configmaps": ("ConfigMap", ""),
    "services": ("Service", ""),
    "serviceaccounts": ("ServiceAccount", ""),
    "secrets": ("Secret", ""),
    "events": ("Event", ""),
    "persistentvolumeclaims": ("PersistentVolumeClaim", ""),
    "ingresses": ("Ingress", "networking.k8s.io"),
    "networkpolicies": ("NetworkPolicy", "networking.k8s.io"),
    "podmonitors": ("PodMonitor", "monitoring.coreos.com"),
}
ROUTE = re.compile(
    r"^/(?:apis/(?P<group>[a-z0-9.]+)/v1|api/v1)/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
SYSTEM_META = ("resourceVersion", "uid", "generation", "creationTimestamp", "managedFields", "namespace")
Path = tuple[str, ...]
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RAY_NAME_MAX = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # KubeRay utils/constant.go
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, status: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": _now(),
    }


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class FakeKubeApi:
    """The store and the fake operator; `url` is what `kubernetes.client.Configuration(host=...)` takes."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace, name) -> object
        self.managed: dict[tuple[str, str, str], dict[tuple[str, str], set[Path]]] = {}  # (manager, op)
        self.steps: dict[tuple[str, str, str], int] = {}
        self.stuck: set[str] = set()
        self.fail_jobs: set[str] = set()
        self.rolling_back: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._version = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                content_type = (self.headers.get("Content-Type") or "").split(";")[0]
                fake.requests.append((method, url.path))
                try:
                    code, payload = fake.handle(method, url.path, parse_qs(url.query), body, content_type)
                except ApiError as err:
                    code = err.code
                    payload = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": err.message,
                        "reason": err.reason,
                        "code": err.code,
                    }
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_PATCH(self) -> None:
                self._serve("PATCH")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- REST ---------------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, content_type: str = ""
    ) -> tuple[int, Any]:
        m = ROUTE.match(path)
        if not m or (m["plural"] not in RAY_PLURALS and m["plural"] not in CORE_PLURALS):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        plural, ns, name = m["plural"], m["ns"], m["name"]
        group = "ray.io" if plural in RAY_PLURALS else CORE_PLURALS[plural][1]
        if (m["group"] or "") != group:
            raise ApiError(404, "NotFound", f"no {plural} under {path}")
        kind = RAY_PLURALS.get(plural) or CORE_PLURALS[plural][0]
        q = {k: v[0] for k, v in query.items()}
        with self._lock:
            if method == "GET" and name is None:
                items = [
                    copy.deepcopy(o)
                    for (p, n, _), o in sorted(self.objects.items())
                    if p == plural and n == ns
                ]
                items = [o for o in items if _matches(o, q.get("labelSelector", ""))]
                items = [o for o in items if _fields_match(o, q.get("fieldSelector", ""))]
                return 200, {"apiVersion": "v1", "kind": f"{kind}List", "metadata": {}, "items": items}
            key = (plural, ns, name or (body or {}).get("metadata", {}).get("name", ""))
            if method == "POST" and name is None:
                return 201, self._create(key, kind, body, q.get("fieldManager", "unknown"))
            if method == "GET":
                obj = self._get(key, kind)
                if plural in RAY_PLURALS:
                    self._advance(key, obj)
                return 200, self._shown(key)
            if method == "PUT" and m["sub"] is None:
                return 200, self._update(key, kind, body, q.get("fieldManager", "unknown"), replace=True)
            if method == "PATCH" and content_type == APPLY:
                if "fieldManager" not in q:
                    raise ApiError(400, "BadRequest", "PATCH: fieldManager is required for apply requests")
                return self._apply(key, kind, body, q["fieldManager"], q.get("force") == "true")
            if method == "PATCH" and content_type == MERGE:
                if "force" in q:
                    raise ApiError(400, "BadRequest", "force must be unset for non-apply patch requests")
                return 200, self._update(key, kind, body, q.get("fieldManager", "unknown"), replace=False)
            if method == "DELETE":
                self._get(key, kind)
                obj = self.objects.pop(key)
                self.steps.pop(key, None)
                self.managed.pop(key, None)
                return 200, obj
        raise ApiError(
            405, "MethodNotAllowed", f"{method} {path} ({content_type}) is not supported by the fake"
        )

    def _get(self, key: tuple[str, str, str], kind: str) -> dict[str, Any]:
        if key not in self.objects:
            raise ApiError(404, "NotFound", f'{kind} "{key[2]}" not found in namespace {key[1]}')
        return self.objects[key]

    def _shown(self, key: tuple[str, str, str]) -> dict[str, Any]:
        """The object as the API server returns it: with managedFields in the FieldsV1 format."""
        obj = copy.deepcopy(self.objects[key])
        obj["metadata"]["managedFields"] = [
            {
                "manager": manager,
                "operation": op,
                "apiVersion": obj.get("apiVersion", "v1"),
                "fieldsType": "FieldsV1",
                "fieldsV1": _fields_v1(paths),
            }
            for (manager, op), paths in sorted(self.managed.get(key, {}).items())
            if paths
        ]
        return obj

    def _check(self, kind: str, body: Any, key: tuple[str, str, str]) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("kind") != kind:
            raise ApiError(
                400, "BadRequest", f"body must be a {kind}, got kind {body and body.get('kind')!r}"
            )
        name = body.get("metadata", {}).get("name", "")
        if not DNS_SUBDOMAIN.match(name) or name != key[2]:
            raise ApiError(
                422, "Invalid", f"{kind} {name!r}: metadata.name must be a DNS subdomain matching the URL"
            )
        obj = copy.deepcopy(body)
        obj.pop("status", None)  # status is a subresource: only the operator writes it
        for field in SYSTEM_META:
            obj["metadata"].pop(field, None)
        if kind in RAY_PLURALS.values():
            # The API server's metadata check of KubeRay objects (as utils.ValidateRay*Metadata).
            if not DNS1035.match(name) or len(name) > RAY_NAME_MAX[kind]:
                raise ApiError(422, "Invalid", f"{kind} name {name!r} should be a valid DNS1035 label")
            errors = crd_errors(obj)
            if errors:
                raise ApiError(422, "Invalid", f'{kind}.ray.io "{name}" is invalid: ' + "; ".join(errors))
        return obj

    def _create(
        self, key: tuple[str, str, str], kind: str, body: Any, manager: str, op: str = "Update"
    ) -> Any:
        obj = self._check(kind, body, key)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{key[0]} "{key[2]}" already exists')
        self._version += 1
        obj["metadata"].pop("resourceVersion", None)
        obj["metadata"].update(
            namespace=key[1],
            uid=str(uuid.uuid4()),
            resourceVersion=str(self._version),
            generation=1,
            creationTimestamp=_now(),
        )
        self.objects[key] = obj
        self.steps[key] = 0
        self.managed[key] = {(manager, op): set(_leaves(_owned_part(obj)))}
        return self._shown(key)

    def _store(self, key: tuple[str, str, str], kind: str, obj: dict[str, Any]) -> None:
        """Write `obj` over the live object: checks, immutable fields, bookkeeping."""
        current = self.objects[key]
        if kind == "PersistentVolumeClaim":
            old, new = copy.deepcopy(current.get("spec", {})), copy.deepcopy(obj.get("spec", {}))
            for spec in (old, new):
                spec.get("resources", {}).get("requests", {}).pop("storage", None)
            if old != new:
                raise ApiError(
                    422,
                    "Invalid",
                    f'PersistentVolumeClaim "{key[2]}" is invalid: spec: Forbidden: spec is '
                    "immutable after creation except resources.requests for bound claims",
                )
        self._check(kind, obj, key)
        self._version += 1
        obj["metadata"].update(
            {k: current["metadata"][k] for k in ("namespace", "uid", "creationTimestamp")},
            resourceVersion=str(self._version),
            generation=current["metadata"]["generation"] + (obj.get("spec") != current.get("spec")),
        )
        if "status" in current:
            obj["status"] = current["status"]
        self.objects[key] = obj

    def _update(self, key: tuple[str, str, str], kind: str, body: Any, manager: str, replace: bool) -> Any:
        """PUT (replace) or merge patch: an "Update" operation taking over every field it changes."""
        current = self._get(key, kind)
        sent = (body or {}).get("metadata", {}).get("resourceVersion")
        if sent and sent != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {key[0]} "{key[2]}": the object has been modified',
            )
        obj = copy.deepcopy(body) if replace else _merge_patch(_without_status(current), body)
        obj.setdefault("metadata", {}).pop("resourceVersion", None)
        before = _leaves(_owned_part(current))
        self._store(key, kind, obj)
        after = _leaves(_owned_part(obj))
        changed = {p for p, v in after.items() if before.get(p, _MISSING) != v}
        self._take(key, (manager, "Update"), changed, set(after))
        return self._shown(key)

    def _apply(self, key: tuple[str, str, str], kind: str, body: Any, manager: str, force: bool) -> Any:
        """Server-side apply: merge owned fields, conflict on others' fields, drop fields left out."""
        if key not in self.objects:
            return 201, self._create(key, kind, body, manager, op="Apply")
        current = self.objects[key]
        applied = _leaves(_owned_part(self._check(kind, body, key)))
        me = (manager, "Apply")
        live = _leaves(_owned_part(current))
        conflicts = sorted(
            {
                (other[0], ".".join(path))
                for path, value in applied.items()
                if live.get(path, _MISSING) != value
                for other, paths in self.managed[key].items()
                if other != me and any(_overlaps(path, q) for q in paths)
            }
        )
        if conflicts and not force:
            listed = "; ".join(f'conflict with "{m}": .{p}' for m, p in conflicts)
            raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s): {listed}")
        obj = _without_status(current)
        owned_by_others = set().union(*(p for o, p in self.managed[key].items() if o != me))
        for path in self.managed[key].get(me, set()) - set(applied):
            if not any(_overlaps(path, q) for q in owned_by_others):
                _delete(obj, path)
        for path, value in applied.items():
            _set(obj, path, copy.deepcopy(value))
        unchanged = obj == _without_status(current) and self.managed[key].get(me) == set(applied)
        if unchanged:  # a no-op apply writes nothing: the resourceVersion stays
            return 200, self._shown(key)
        self._store(key, kind, obj)
        self._take(key, me, set(applied) if force else set(), set(applied))
        self.managed[key][me] = set(applied)
        return 200, self._shown(key)

    def _take(
        self, key: tuple[str, str, str], who: tuple[str, str], taken: set[Path], mine: set[Path]
    ) -> None:
        """`who` now owns `mine`; fields in `taken` (changed, or forced) leave every other manager."""
        for other, paths in self.managed[key].items():
            if other != who:
                paths -= {q for q in paths if any(_overlaps(q, t) for t in taken)}
        self.managed[key].setdefault(who, set()).update(mine if who[1] == "Apply" else taken)

    def autoscale(self, namespace: str, cluster: str, group: str, replicas: int, delete: list[str]) -> None:
        """What the Ray autoscaler does through the operator: an Update of the worker group's replicas
        and workersToDelete (the whole `workerGroupSpecs` list: it is atomic)."""
        with self._lock:
            key = ("rayclusters", namespace, cluster)
            groups = copy.deepcopy(self.objects[key]["spec"]["workerGroupSpecs"])
            for g in groups:
                if g["groupName"] == group:
                    g["replicas"] = replicas
                    g["scaleStrategy"] = {"workersToDelete": delete}
            self._update(
                key, "RayCluster", {"spec": {"workerGroupSpecs": groups}}, "autoscaler", replace=False
            )

    # --- the fake operator ---------------------------------------------------------------------

    def _advance(self, key: tuple[str, str, str], obj: dict[str, Any]) -> None:
        if key[2] in self.stuck:
            return
        rejected = _operator_rejects(obj)
        if rejected:
            self._reject(key, obj, rejected)
            return
        step = self.steps[key] = self.steps[key] + 1
        status = {
            "RayCluster": self._cluster_status,
            "RayJob": self._job_status,
            "RayService": self._service_status,
        }[obj["kind"]](obj, step)
        status["observedGeneration"] = obj["metadata"]["generation"]
        obj["status"] = status
        errors = crd_errors(obj)
        assert not errors, f"fake operator wrote an invalid status: {errors}"
        self._token_secret(key[1], obj)

    def _reject(self, key: tuple[str, str, str], obj: dict[str, Any], reason: str) -> None:
        """What the operator does with a spec it refuses: a status (RayJob, RayService) or only an event."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "RayJob":
            obj["status"] = {
                "jobDeploymentStatus": "ValidationFailed",
                "reason": "ValidationFailed",
                "message": reason,
            }
        elif kind == "RayService":
            obj["status"] = {"conditions": [_condition("Ready", False, "ValidationFailed", reason)]}
        else:
            event_key = ("events", key[1], f"{name}.invalid")
            self.objects[event_key] = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{name}.invalid", "namespace": key[1]},
                "involvedObject": {
                    "kind": kind,
                    "name": name,
                    "namespace": key[1],
                    "apiVersion": "ray.io/v1",
                },
                "type": "Warning",
                "reason": "InvalidRayClusterSpec",
                "message": f"The RayCluster spec is invalid {key[1]}/{name}: {reason}",
            }
        assert not crd_errors(obj), crd_errors(obj)

    def _token_secret(self, namespace: str, obj: dict[str, Any]) -> None:
        """KubeRay's reconcileAuthSecret: a Secret named after the RayCluster, key auth_token."""
        spec, status = obj["spec"], obj.get("status") or {}
        cluster_spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        auth = cluster_spec.get("authOptions") or {}
        if auth.get("mode") != "token" or auth.get("secretName"):
            return
        cluster = {
            "RayCluster": obj["metadata"]["name"],
            "RayJob": status.get("rayClusterName"),
            "RayService": (status.get("activeServiceStatus") or status.get("pendingServiceStatus") or {}).get(
                "rayClusterName"
            ),
        }[obj["kind"]]
        key = ("secrets", namespace, cluster or "")
        if cluster and key not in self.objects:
            token = base64.b64encode(uuid.uuid4().bytes).decode()
            self.objects[key] = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": cluster, "namespace": namespace, "labels": {"ray.io/cluster": cluster}},
                "data": {"auth_token": base64.b64encode(token.encode()).decode()},
            }

    @staticmethod
    def _cluster_status(obj: dict[str, Any], step: int) -> dict[str, Any]:
        spec = obj["spec"]
        workers = sum(g.get("replicas", 0) for g in spec.get("workerGroupSpecs", []))
        ready = step >= 2
        return {
            "state": "ready" if ready else "",
            "readyWorkerReplicas": workers if ready else 0,
            "availableWorkerReplicas": workers if ready else 0,
            "desiredWorkerReplicas": workers,
            "head": {"podIP": "10.0.0.10", "serviceIP": "10.96.0.10"} if ready else {},
            "conditions": [
                _condition("HeadPodReady", ready, "HeadPodRunningAndReady" if ready else "HeadPodNotFound"),
                _condition(
                    "RayClusterProvisioned", ready, "AllPodRunningAndReadyFirstTime" if ready else "Pending"
                ),
            ],
        }

    def _job_status(self, obj: dict[str, Any], step: int) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        phases = [("Initializing", ""), ("Running", "RUNNING"), ("Running", "RUNNING")]
        final = ("Failed", "FAILED") if name in self.fail_jobs else ("Complete", "SUCCEEDED")
        deployment, job = phases[step - 1] if step <= len(phases) else final
        status: dict[str, Any] = {
            "jobDeploymentStatus": deployment,
            "rayClusterName": f"{name}-raycluster-x7k2p",
            "startTime": obj["metadata"]["creationTimestamp"],
        }
        if job:
            status |= {"jobStatus": job, "jobId": f"{name}-abc12", "dashboardURL": f"{name}-head-svc:8265"}
        if (deployment, job) == final:
            status |= {"endTime": _now(), "message": f"Job finished with {job}"}
            status["failed" if job == "FAILED" else "succeeded"] = 1
        return status

    def _service_status(self, obj: dict[str, Any], step: int) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        serve = yaml.safe_load(obj["spec"].get("serveConfigV2") or "{}") or {}
        apps = serve.get("applications", [])

        def app_status(app_state: str, dep_state: str) -> dict[str, Any]:
            return {
                a["name"]: {
                    "status": app_state,
                    "serveDeploymentStatuses": {
                        d["name"]: {"status": dep_state} for d in a.get("deployments", [])
                    },
                }
                for a in apps
            }

        if step <= 1:
            return {
                "pendingServiceStatus": {"rayClusterName": f"{name}-abcde", "applicationStatuses": {}},
                "conditions": [_condition("Ready", False, "Initializing")],
            }
        if step == 2:
            return {
                "pendingServiceStatus": {
                    "rayClusterName": f"{name}-abcde",
                    "applicationStatuses": app_status("DEPLOYING", "UPDATING"),
                },
                "conditions": [_condition("Ready", False, "Initializing")],
            }
        if name in self.rolling_back:
            return {
                "activeServiceStatus": {
                    "rayClusterName": f"{name}-abcde",
                    "applicationStatuses": app_status("RUNNING", "HEALTHY"),
                },
                "pendingServiceStatus": {
                    "rayClusterName": f"{name}-fghij",
                    "applicationStatuses": app_status("DEPLOY_FAILED", "UNHEALTHY"),
                },
                "numServeEndpoints": 2,
                "conditions": [
                    _condition("Ready", True, "NonZeroServeEndpoints"),
                    _condition("UpgradeInProgress", True, "BothActivePendingClustersExist"),
                    _condition("RollbackInProgress", True, "RollbackInProgress"),
                ],
            }
        return {
            "activeServiceStatus": {
                "rayClusterName": f"{name}-abcde",
                "applicationStatuses": app_status("RUNNING", "HEALTHY"),
            },
            "numServeEndpoints": 2,
            "serviceStatus": "Running",
            "conditions": [
                _condition("Ready", True, "NonZeroServeEndpoints"),
                _condition("UpgradeInProgress", False, "NoPendingCluster"),
            ],
        }


def _matches(obj: dict[str, Any], selector: str) -> bool:
    """Equality-based label selectors (`a=b,c=d`), the kind the client sends."""
    labels = obj.get("metadata", {}).get("labels", {}) or {}
    for term in filter(None, selector.split(",")):
        k, _, v = term.partition("=")
        if labels.get(k.strip()) != v.strip().lstrip("="):
            return False
    return True


def _fields_match(obj: dict[str, Any], selector: str) -> bool:
    """Field selectors (`involvedObject.name=x,involvedObject.kind=y`), as events are listed."""
    for term in filter(None, selector.split(",")):
        path, _, value = term.partition("=")
        node: Any = obj
        for part in path.strip().split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value.strip():
            return False
    return True


def _operator_rejects(obj: dict[str, Any]) -> str | None:
    """A few of the operator's runtime rules, restated from its utils/validation.go."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    for g in cluster.get("workerGroupSpecs", []):
        if g.get("minReplicas", 0) > g.get("maxReplicas", 2**31 - 1):
            lo, hi = g["minReplicas"], g["maxReplicas"]
            return f"worker group {g['groupName']} has minReplicas {lo} greater than maxReplicas {hi}"
    if (
        obj["kind"] == "RayJob"
        and not spec.get("shutdownAfterJobFinishes")
        and spec.get("ttlSecondsAfterFinished", 0) > 0
    ):
        return "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
    return None


# --- server-side apply bookkeeping: a field is a path of map keys; lists and scalars are leaves ----------

_MISSING = object()


def _owned_part(obj: dict[str, Any]) -> dict[str, Any]:
    """What managers own: everything but identity, server-set metadata and the status."""
    out = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "status")}
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in (*SYSTEM_META, "name")}
    out["metadata"] = meta
    return out


def _leaves(node: dict[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _overlaps(a: Path, b: Path) -> bool:
    """One field contains the other (or they are the same)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _set(obj: dict[str, Any], path: Path, value: Any) -> None:
    for part in path[:-1]:
        if not isinstance(obj.get(part), dict):
            obj[part] = {}
        obj = obj[part]
    obj[path[-1]] = value


def _delete(obj: dict[str, Any], path: Path) -> None:
    parents = []
    for part in path[:-1]:
        if not isinstance(obj.get(part), dict):
            return
        parents.append((obj, part))
        obj = obj[part]
    obj.pop(path[-1], None)
    for parent, part in reversed(parents):  # drop maps left empty
        if parent[part] == {}:
            del parent[part]


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _without_status(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in obj.items() if k != "status"}


def _fields_v1(paths: set[Path]) -> dict[str, Any]:
    """Paths in the API server's FieldsV1 shape ({"f:spec": {"f:replicas": {}}})."""
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return root
