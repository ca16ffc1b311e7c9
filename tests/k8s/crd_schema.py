"""Validate objects against the KubeRay v1.7.0 CRD OpenAPI schemas with `jsonschema`.

The API server's structural schemas differ from JSON Schema in a few extensions; they are mapped here:
- objects with `properties` reject unknown fields (what `kubectl apply --validate=strict` and the
  `fieldValidation=Strict` our client sends do), unless `x-kubernetes-preserve-unknown-fields`;
- `x-kubernetes-int-or-string` accepts an integer or a string;
- `nullable: true` accepts null.
CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CRD_DIR = Path(__file__).resolve().parents[2] / "third_party" / "kuberay" / "crds"  # KubeRay v1.7.0
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """JSON Schema of `kind` at the served `version`, strict about unknown fields."""
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=_LOADER)  # 1 MB files: C loader
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    assert served, f"{kind} {version} not served by the CRD"
    schema = _strict(copy.deepcopy(served[0]["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is validated by the API server itself
    return schema


@cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    schema = crd_schema(kind)
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of `obj` as 'path: message' (empty list = valid)."""
    kind = obj.get("kind", "")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not a KubeRay kind"]
    if obj.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion: {obj.get('apiVersion')!r} is not ray.io/v1"]
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator(kind).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]
