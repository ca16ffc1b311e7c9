"""The KubeRay operator's runtime rules (cluster/kuberay_rules.py), one rejecting test each, on manifests the
real chart renders; and `raylm k8s render` refusing a manifest the operator would refuse."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.k8s_render import RenderError, check_operator_rules
from cluster.kuberay_rules import operator_errors
from tests.k8s.conftest import CHART, docs_of, run_helm
from tests.k8s.crd_schema import crd_errors


@cache
def _rendered(helm: str, mode: str) -> str:
    return run_helm(
        helm, "template", "rules", str(CHART), "-f", str(CHART / "ci" / f"{mode}-values.yaml")
    ).stdout


def ray_object(helm: str, mode: str) -> dict[str, Any]:
    return next(d for d in docs_of(_rendered(helm, mode)) if d["apiVersion"] == "ray.io/v1")


def cluster(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def group(obj: dict[str, Any]) -> dict[str, Any]:
    return cluster(obj)["workerGroupSpecs"][0]


def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda o: o["spec"].update(values)


def _incremental(**options: Any) -> Callable[[dict[str, Any]], None]:
    base = {"maxSurgePercent": 50, "stepSizePercent": 25, "intervalSeconds": 30, "gatewayClassName": "istio"}
    return _set(
        upgradeStrategy={
            "type": "NewClusterWithIncrementalUpgrade",
            "clusterUpgradeOptions": {**base, **options},
        }
    )


RULES: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    # (id, mode, mutation, expected message part)
    (
        "min>max",
        "cluster",
        lambda o: group(o).update(minReplicas=5, maxReplicas=2),
        "minReplicas 5 greater than maxReplicas 2",
    ),
    ("negative", "cluster", lambda o: group(o).update(minReplicas=-1), "negative minReplicas"),
    (
        "bounds-without-autoscaler",
        "job",
        lambda o: group(o).pop("maxReplicas"),
        "needs min/maxReplicas without autoscaling",
    ),
    (
        "idle-timeout-v1",
        "cluster",
        lambda o: cluster(o)["autoscalerOptions"].update(version="v1"),
        "idleTimeoutSeconds: set, but autoscaler v2 is not enabled",
    ),
    (
        "labels-param",
        "cluster",
        lambda o: group(o)["rayStartParams"].update(labels="a=b"),
        "'labels' is not supported",
    ),
    (
        "suspend-group",
        "cluster",
        lambda o: group(o).update(suspend=True),
        "cannot be suspended with the autoscaler",
    ),
    (
        "redis-password",
        "service",
        lambda o: cluster(o)["headGroupSpec"]["rayStartParams"].update({"redis-password": "x"}),
        "redis-password belongs in GCS FT options",
    ),
    (
        "redis-username",
        "cluster",
        lambda o: cluster(o)["headGroupSpec"]["rayStartParams"].update({"redis-username": "x"}),
        "redis username belongs in gcsFaultToleranceOptions",
    ),
    (
        "token-old-ray",
        "cluster",
        lambda o: cluster(o).update(rayVersion="2.51.0"),
        "'token' needs rayVersion >= 2.52.0",
    ),
    (
        "k8s-auth-without-token",
        "cluster",
        lambda o: cluster(o).update(authOptions={"mode": "disabled", "enableK8sTokenAuth": True}),
        "enableK8sTokenAuth: needs authOptions.mode 'token'",
    ),
    (
        "cluster-upgrade-type",
        "cluster",
        lambda o: o["spec"].update(upgradeStrategy={"type": "NewCluster"}),
        "allowed: Recreate, None",
    ),
    (
        "ttl-without-shutdown",
        "job",
        _set(shutdownAfterJobFinishes=False),
        "ttlSecondsAfterFinished: needs shutdownAfterJobFinishes",
    ),
    (
        "suspend-without-shutdown",
        "job",
        _set(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0, suspend=True),
        "cannot be suspended",
    ),
    (
        "sidecar-submitter",
        "job",
        _set(submissionMode="SidecarMode"),
        "submitterPodTemplate: not supported with submissionMode SidecarMode",
    ),
    (
        "interactive-backoff",
        "job",
        _set(submissionMode="InteractiveMode"),
        "backoffLimit: incompatible with InteractiveMode",
    ),
    ("runtime-env-yaml", "job", _set(runtimeEnvYAML="env_vars: {A: [1"), "runtimeEnvYAML: not valid YAML"),
    ("deadline", "job", _set(activeDeadlineSeconds=0), "activeDeadlineSeconds: must be a positive integer"),
    (
        "no-cluster",
        "job",
        lambda o: o["spec"].pop("rayClusterSpec"),
        "one of rayClusterSpec or clusterSelector",
    ),
    (
        "rules-with-shutdown",
        "job",
        _set(
            deletionStrategy={
                "deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}]
            }
        ),
        "mutually exclusive with shutdownAfterJobFinishes",
    ),
    (
        "legacy-and-rules",
        "job",
        _set(
            shutdownAfterJobFinishes=False,
            ttlSecondsAfterFinished=0,
            deletionStrategy={
                "onSuccess": {"policy": "DeleteSelf"},
                "onFailure": {"policy": "DeleteSelf"},
                "deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}],
            },
        ),
        "either onSuccess/onFailure or deletionRules",
    ),
    (
        "legacy-half",
        "job",
        _set(deletionStrategy={"onSuccess": {"policy": "DeleteSelf"}}),
        "must both be set",
    ),
    (
        "delete-none-with-shutdown",
        "job",
        _set(deletionStrategy={"onSuccess": {"policy": "DeleteNone"}, "onFailure": {"policy": "DeleteSelf"}}),
        "DeleteNone contradicts shutdownAfterJobFinishes",
    ),
    (
        "delete-workers-autoscaling",
        "job",
        lambda o: (
            cluster(o).update(enableInTreeAutoscaling=True),
            o["spec"].update(
                deletionStrategy={
                    "onSuccess": {"policy": "DeleteWorkers"},
                    "onFailure": {"policy": "DeleteSelf"},
                }
            ),
        ),
        "DeleteWorkers does not support autoscaling",
    ),
    (
        "empty-strategy",
        "job",
        _set(deletionStrategy={}),
        "needs both onSuccess and onFailure, or deletionRules",
    ),
    (
        "rule-two-statuses",
        "job",
        _set(
            shutdownAfterJobFinishes=False,
            ttlSecondsAfterFinished=0,
            deletionStrategy={
                "deletionRules": [
                    {
                        "policy": "DeleteSelf",
                        "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"},
                    }
                ]
            },
        ),
        "set exactly one of jobStatus and jobDeploymentStatus",
    ),
    (
        "rule-duplicate",
        "job",
        _set(
            shutdownAfterJobFinishes=False,
            ttlSecondsAfterFinished=0,
            deletionStrategy={
                "deletionRules": [
                    {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "ttlSeconds": 10}},
                    {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "ttlSeconds": 20}},
                ]
            },
        ),
        "duplicate rule for DeleteSelf",
    ),
    (
        "rule-ttl-order",
        "job",
        _set(
            shutdownAfterJobFinishes=False,
            ttlSecondsAfterFinished=0,
            deletionStrategy={
                "deletionRules": [
                    {"policy": "DeleteSelf", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 10}},
                    {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60}},
                ]
            },
        ),
        "DeleteSelf TTL 10 must be >= DeleteCluster TTL 60",
    ),
    (
        "serve-config-yaml",
        "service",
        _set(serveConfigV2="applications: [{name: raylm"),
        "serveConfigV2: not valid YAML",
    ),
    (
        "serve-config-shape",
        "service",
        _set(serveConfigV2="- just\n- a list\n"),
        "serveConfigV2: must be a YAML mapping",
    ),
    (
        "deletion-delay",
        "service",
        _set(rayClusterDeletionDelaySeconds=-5),
        "rayClusterDeletionDelaySeconds: must be non-negative",
    ),
    (
        "head-service-name",
        "service",
        lambda o: cluster(o)["headGroupSpec"].update(headService={"metadata": {"name": "mine"}}),
        "headService.metadata.name: must not be set",
    ),
    (
        "service-upgrade-type",
        "service",
        _set(upgradeStrategy={"type": "Rolling"}),
        "upgradeStrategy.type: 'Rolling'",
    ),
    (
        "incremental-no-autoscaler",
        "service",
        lambda o: (_incremental()(o), cluster(o).update(enableInTreeAutoscaling=False)),
        "NewClusterWithIncrementalUpgrade needs the Ray autoscaler",
    ),
    (
        "incremental-no-options",
        "service",
        lambda o: (
            cluster(o).update(enableInTreeAutoscaling=True),
            _set(upgradeStrategy={"type": "NewClusterWithIncrementalUpgrade"})(o),
        ),
        "clusterUpgradeOptions: required",
    ),
    (
        "incremental-step>surge",
        "service",
        lambda o: (cluster(o).update(enableInTreeAutoscaling=True), _incremental(stepSizePercent=80)(o)),
        "stepSizePercent: must be <= maxSurgePercent",
    ),
    (
        "incremental-interval",
        "service",
        lambda o: (cluster(o).update(enableInTreeAutoscaling=True), _incremental(intervalSeconds=0)(o)),
        "intervalSeconds: must be greater than 0",
    ),
    (
        "incremental-gateway",
        "service",
        lambda o: (cluster(o).update(enableInTreeAutoscaling=True), _incremental(gatewayClassName="")(o)),
        "gatewayClassName: required",
    ),
    ("name-too-long", "job", lambda o: o["metadata"].update(name="j" * 48), "longer than 47 characters"),
    ("name-dns1035", "cluster", lambda o: o["metadata"].update(name="7b-chat"), "must be a DNS-1035 label"),
]


@pytest.mark.parametrize("mode", ["cluster", "job", "service"])
def test_rendered_ci_manifests_pass_the_operator_rules(helm: str, mode: str) -> None:
    assert operator_errors(ray_object(helm, mode)) == []


# Rules the CRD schema enforces too (the operator repeats them); only the operator catches the others.
SCHEMA_TOO = {"bounds-without-autoscaler", "cluster-upgrade-type", "deletion-delay", "no-cluster"}


@pytest.mark.parametrize(("rule", "mode", "mutate", "message"), RULES, ids=[r[0] for r in RULES])
def test_operator_rule_rejects(
    helm: str, rule: str, mode: str, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    obj = ray_object(helm, mode)
    mutate(obj)
    errors = operator_errors(obj)
    assert any(message in e for e in errors), errors
    if rule not in SCHEMA_TOO:  # metadata is checked by the API server, not by the CRD schema
        assert crd_errors(obj) == [], crd_errors(obj)


def test_render_check_fails_naming_the_object_and_rule(helm: str) -> None:
    text = _rendered(helm, "job").replace("shutdownAfterJobFinishes: true", "shutdownAfterJobFinishes: false")
    with pytest.raises(RenderError) as err:
        check_operator_rules(text)
    assert "the KubeRay operator would reject RayJob rules" in str(err.value)
    assert "spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true" in str(err.value)


def test_render_refuses_what_the_operator_would_refuse(helm: str, run_file: Path) -> None:
    """End to end: a config the typed config accepts but KubeRay would fail at runtime (deletionRules
    with shutdownAfterJobFinishes) never leaves `raylm k8s render`."""
    rules = '{"deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}]}'
    result = CliRunner().invoke(
        app, ["k8s", "render", str(run_file), "--mode", "job", "--set", f"k8s.job.deletion_strategy={rules}"]
    )
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "the KubeRay operator would reject RayJob" in out
    assert "deletionRules: mutually exclusive with shutdownAfterJobFinishes" in out
    ok = CliRunner().invoke(
        app,
        [
            "k8s",
            "render",
            str(run_file),
            "--mode",
            "job",
            "--set",
            f"k8s.job.deletion_strategy={rules}",
            "--set",
            "k8s.job.shutdown_after_finishes=false",
        ],
    )
    assert ok.exit_code == 0, ok.output
    job = next(d for d in docs_of(ok.stdout) if d["kind"] == "RayJob")
    assert job["spec"]["deletionStrategy"]["deletionRules"][0]["policy"] == "DeleteCluster"
    assert crd_errors(job) == []
