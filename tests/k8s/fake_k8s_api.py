"""A FAKE Kubernetes API server, in-process, for testing the KubeRay client without a cluster.

It implements the REST routes the client uses (custom objects under ray.io/v1, plus ConfigMaps,
Services, PVCs and Ingresses), answers with real Kubernetes `Status` errors (404, 409, 422), keeps
`resourceVersion` for optimistic replaces, rejects Ray objects that break the KubeRay v1.7.0 CRD
schemas, and plays the KubeRay operator: every read of a Ray object advances its status one step
(RayCluster -> ready, RayJob -> Complete, RayService -> pending cluster -> active and healthy),
so `wait()` can succeed. Names in `stuck` never advance (for timeout tests); names in `fail_jobs`
end as Failed. Statuses it writes are validated against the CRD status schema too.
"""

from __future__ import annotations

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
CORE_PLURALS = {
    "configmaps": "ConfigMap",
    "services": "Service",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "ingresses": "Ingress",
}
ROUTE = re.compile(
    r"^/(?:apis/(?P<group>ray\.io|networking\.k8s\.io)/v1|api/v1)/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)
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
        self.steps: dict[tuple[str, str, str], int] = {}
        self.stuck: set[str] = set()
        self.fail_jobs: set[str] = set()
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
                fake.requests.append((method, url.path))
                try:
                    code, payload = fake.handle(method, url.path, parse_qs(url.query), body)
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

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        m = ROUTE.match(path)
        if not m or (m["plural"] not in RAY_PLURALS and m["plural"] not in CORE_PLURALS):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
        if (m["group"] == "ray.io") != (m["plural"] in RAY_PLURALS):
            raise ApiError(404, "NotFound", f"no {m['plural']} under {path}")
        plural, ns, name = m["plural"], m["ns"], m["name"]
        kind = RAY_PLURALS.get(plural) or CORE_PLURALS[plural]
        with self._lock:
            if method == "GET" and name is None:
                items = [
                    copy.deepcopy(o)
                    for (p, n, _), o in sorted(self.objects.items())
                    if p == plural and n == ns
                ]
                items = [o for o in items if _matches(o, (query.get("labelSelector") or [""])[0])]
                return 200, {"apiVersion": "v1", "kind": f"{kind}List", "metadata": {}, "items": items}
            key = (plural, ns, name or (body or {}).get("metadata", {}).get("name", ""))
            if method == "POST" and name is None:
                return 201, self._create(key, kind, body)
            if method == "GET":
                obj = self._get(key, kind)
                if plural in RAY_PLURALS:
                    self._advance(key, obj)
                return 200, copy.deepcopy(obj)
            if method == "PUT" and m["sub"] is None:
                return 200, self._replace(key, kind, body)
            if method == "DELETE":
                self._get(key, kind)
                obj = self.objects.pop(key)
                self.steps.pop(key, None)
                return 200, obj
        raise ApiError(405, "MethodNotAllowed", f"{method} {path} is not supported by the fake")

    def _get(self, key: tuple[str, str, str], kind: str) -> dict[str, Any]:
        if key not in self.objects:
            raise ApiError(404, "NotFound", f'{kind} "{key[2]}" not found in namespace {key[1]}')
        return self.objects[key]

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
        if kind in RAY_PLURALS.values():
            # The KubeRay operator's own metadata check (utils.ValidateRay*Metadata): a DNS-1035 label.
            if not DNS1035.match(name) or len(name) > RAY_NAME_MAX[kind]:
                raise ApiError(422, "Invalid", f"{kind} name {name!r} should be a valid DNS1035 label")
            errors = crd_errors(obj)
            if errors:
                raise ApiError(422, "Invalid", f'{kind}.ray.io "{name}" is invalid: ' + "; ".join(errors))
        return obj

    def _create(self, key: tuple[str, str, str], kind: str, body: Any) -> dict[str, Any]:
        obj = self._check(kind, body, key)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{key[0]} "{key[2]}" already exists')
        self._version += 1
        obj["metadata"].update(
            namespace=key[1],
            uid=str(uuid.uuid4()),
            resourceVersion=str(self._version),
            generation=1,
            creationTimestamp=_now(),
        )
        self.objects[key] = obj
        self.steps[key] = 0
        return copy.deepcopy(obj)

    def _replace(self, key: tuple[str, str, str], kind: str, body: Any) -> dict[str, Any]:
        current = self._get(key, kind)
        obj = self._check(kind, body, key)
        sent = obj["metadata"].get("resourceVersion")
        if sent and sent != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {key[0]} "{key[2]}": the object has been modified',
            )
        self._version += 1
        obj["metadata"].update(
            {k: current["metadata"][k] for k in ("namespace", "uid", "creationTimestamp")},
            resourceVersion=str(self._version),
            generation=current["metadata"]["generation"] + (obj.get("spec") != current.get("spec")),
        )
        if "status" in current:
            obj["status"] = current["status"]
        self.objects[key] = obj
        return copy.deepcopy(obj)

    # --- the fake operator ---------------------------------------------------------------------

    def _advance(self, key: tuple[str, str, str], obj: dict[str, Any]) -> None:
        if key[2] in self.stuck:
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

    @staticmethod
    def _service_status(obj: dict[str, Any], step: int) -> dict[str, Any]:
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
