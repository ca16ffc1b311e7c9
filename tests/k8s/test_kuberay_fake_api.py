"""The KubeRay client against an in-process FAKE Kubernetes API server (tests/k8s/fake_k8s_api.py) that
enforces the KubeRay v1.7.0 CRD schemas and advances status like the operator would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import load_config
from cluster.k8s_render import release_name, render
from cluster.kuberay import (
    ConflictError,
    InvalidError,
    Kind,
    KubeRayClient,
    NotFoundError,
    RayClusterStatus,
    RayJobStatus,
    RayServiceStatus,
    WaitTimeoutError,
)
from tests.k8s.conftest import NAMESPACE, docs_of
from tests.k8s.fake_k8s_api import FakeKubeApi

runner = CliRunner()


def manifest(run_file: Path, mode: str, stage: str = "train") -> dict:
    """The Ray object of the chart's real rendering of `run_file`."""
    docs = docs_of(render(load_config(run_file), mode, stage))
    return next(d for d in docs if d["apiVersion"] == "ray.io/v1")


def job_name(run_file: Path, stage: str = "train", overrides: list[str] | None = None) -> str:
    return release_name(load_config(run_file, overrides), "job", stage)


def test_raycluster_create_wait_status_delete(helm: str, run_file: Path, kuberay: KubeRayClient) -> None:
    obj = manifest(run_file, "cluster")
    created = kuberay.create(obj)
    assert created["metadata"]["resourceVersion"]
    first = kuberay.status(Kind.RAY_CLUSTER, "k8s-demo")
    assert isinstance(first, RayClusterStatus) and not first.ready
    ready = kuberay.wait(Kind.RAY_CLUSTER, "k8s-demo", timeout_s=30, poll_s=0.01)
    assert ready.ready and ready.state == "ready"
    assert (ready.ready_workers, ready.desired_workers, ready.head_ip) == (1, 1, "10.0.0.10")
    assert [o["metadata"]["name"] for o in kuberay.list(Kind.RAY_CLUSTER)] == ["k8s-demo"]
    kuberay.delete(Kind.RAY_CLUSTER, "k8s-demo")
    assert kuberay.list(Kind.RAY_CLUSTER) == []


def test_rayjob_runs_to_completion(helm: str, run_file: Path, kuberay: KubeRayClient) -> None:
    kuberay.create(manifest(run_file, "job", "data"))
    seen: list[str] = []
    done = kuberay.wait(
        Kind.RAY_JOB,
        job_name(run_file, "data"),
        timeout_s=30,
        poll_s=0.01,
        on_poll=lambda s: seen.append(s.deployment_status),
    )
    assert isinstance(done, RayJobStatus)
    assert done.finished and done.succeeded and done.job_status == "SUCCEEDED"
    assert seen[:2] == ["Initializing", "Running"] and seen[-1] == "Complete"
    assert done.cluster_name.startswith(f"{job_name(run_file, 'data')}-raycluster")


def test_rayjob_failure_is_reported_not_hidden(
    helm: str, run_file: Path, kuberay: KubeRayClient, fake_k8s: FakeKubeApi
) -> None:
    fake_k8s.fail_jobs.add(job_name(run_file))
    kuberay.create(manifest(run_file, "job"))
    done = kuberay.wait(Kind.RAY_JOB, job_name(run_file), timeout_s=30, poll_s=0.01)
    assert done.finished and not done.succeeded
    assert (done.deployment_status, done.job_status, done.failed_attempts) == ("Failed", "FAILED", 1)


def test_rayservice_status_shows_pending_then_active_cluster_and_app_health(
    helm: str, run_file: Path, kuberay: KubeRayClient
) -> None:
    kuberay.create(manifest(run_file, "service"))
    kuberay.status(Kind.RAY_SERVICE, "k8s-demo")
    pending = kuberay.status(Kind.RAY_SERVICE, "k8s-demo")
    assert isinstance(pending, RayServiceStatus)
    assert pending.active is None and pending.upgrading and not pending.ready
    assert pending.pending.cluster_name == "k8s-demo-abcde"
    assert pending.pending.applications["raylm"].status == "DEPLOYING"
    assert not pending.pending.healthy
    ready = kuberay.wait(Kind.RAY_SERVICE, "k8s-demo", timeout_s=30, poll_s=0.01)
    assert ready.ready and ready.pending is None and ready.num_serve_endpoints == 2
    app_status = ready.active.applications["raylm"]
    assert app_status.healthy
    assert app_status.deployments == {"LLMServer": "HEALTHY"}  # the OpenAI routes live on the model replica


def test_create_twice_conflicts(helm: str, run_file: Path, kuberay: KubeRayClient) -> None:
    obj = manifest(run_file, "cluster")
    kuberay.create(obj)
    with pytest.raises(ConflictError) as err:
        kuberay.create(obj)
    assert err.value.status == 409 and "already exists" in str(err.value)


def test_fake_server_side_apply_creates_then_merges_as_raylm(
    helm: str, run_file: Path, kuberay: KubeRayClient, fake_k8s: FakeKubeApi
) -> None:
    obj = manifest(run_file, "cluster")
    created = kuberay.apply(obj)
    assert created["metadata"]["generation"] == 1
    managers = [(m["manager"], m["operation"]) for m in created["metadata"]["managedFields"]]
    assert managers == [("raylm", "Apply")]
    assert "f:workerGroupSpecs" in created["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]
    obj["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 5
    updated = kuberay.apply(obj)
    assert updated["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 5
    assert updated["metadata"]["generation"] == 2
    assert ("PATCH", f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/k8s-demo") in fake_k8s.requests
    assert not any(method in ("PUT", "POST") for method, _ in fake_k8s.requests)  # apply never replaces


def test_stale_patch_conflicts(helm: str, run_file: Path, kuberay: KubeRayClient) -> None:
    stale = kuberay.apply(manifest(run_file, "cluster"))
    kuberay.scale("k8s-demo", "gpu", replicas=2)  # someone else updates it: resourceVersion moves on
    with pytest.raises(ConflictError, match="has been modified"):
        kuberay.patch(
            Kind.RAY_CLUSTER,
            "k8s-demo",
            {
                "metadata": {"resourceVersion": stale["metadata"]["resourceVersion"]},
                "spec": {"suspend": True},
            },
        )


def test_not_found_everywhere(kuberay: KubeRayClient) -> None:
    for call in (
        lambda: kuberay.get(Kind.RAY_JOB, "nope"),
        lambda: kuberay.status(Kind.RAY_SERVICE, "nope"),
        lambda: kuberay.delete(Kind.RAY_CLUSTER, "nope"),
        lambda: kuberay.wait(Kind.RAY_JOB, "nope", timeout_s=1, poll_s=0.01),
    ):
        with pytest.raises(NotFoundError) as err:
            call()
        assert err.value.status == 404 and "nope" in str(err.value)


def test_wait_times_out_with_last_status(
    helm: str, run_file: Path, kuberay: KubeRayClient, fake_k8s: FakeKubeApi
) -> None:
    fake_k8s.stuck.add("k8s-demo")
    kuberay.create(manifest(run_file, "service"))
    with pytest.raises(WaitTimeoutError) as err:
        kuberay.wait(Kind.RAY_SERVICE, "k8s-demo", timeout_s=0.2, poll_s=0.05)
    assert isinstance(err.value, TimeoutError)
    assert "not ready after 0.2s" in str(err.value)
    assert isinstance(err.value.last, RayServiceStatus) and not err.value.last.ready


def test_fake_enforces_crd_schema(helm: str, run_file: Path, kuberay: KubeRayClient) -> None:
    obj = manifest(run_file, "job")
    obj["spec"]["backoffLimit"] = "three"
    obj["spec"]["entrypoint_typo"] = "python -m jobs.pretrain"
    with pytest.raises(InvalidError) as err:
        kuberay.create(obj)
    assert err.value.status == 422
    assert "spec.backoffLimit: 'three' is not of type 'integer'" in str(err.value)
    assert "entrypoint_typo" in str(err.value)
    assert kuberay.list(Kind.RAY_JOB) == []
    obj = manifest(run_file, "cluster")
    obj["metadata"]["name"] = "7b-cluster"
    with pytest.raises(InvalidError, match="DNS1035"):
        kuberay.create(obj)


def test_kind_parsing() -> None:
    assert Kind.parse("RayService") is Kind.parse("rayservices") is Kind.RAY_SERVICE
    with pytest.raises(ValueError, match="allowed: RayCluster, RayJob, RayService"):
        Kind.parse("Deployment")


def test_cli_apply_status_wait_delete(
    helm: str, run_file: Path, kubeconfig: Path, fake_k8s: FakeKubeApi
) -> None:
    common = [str(run_file), "--mode", "service", "--kubeconfig", str(kubeconfig)]
    result = runner.invoke(app, ["k8s", "apply", *common])
    assert result.exit_code == 0, result.output
    kinds = {(p, name) for p, _, name in fake_k8s.objects if p != "secrets"}
    assert kinds == {
        ("configmaps", "k8s-demo-config"),
        ("ingresses", "k8s-demo-endpoint"),
        ("rayservices", "k8s-demo"),
        ("persistentvolumeclaims", "k8s-demo-storage"),
    }
    again = runner.invoke(app, ["k8s", "apply", *common, "--set", "k8s.image.tag=2.0.0"])
    assert again.exit_code == 0, again.output
    rs = fake_k8s.objects[("rayservices", NAMESPACE, "k8s-demo")]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "registry.example.com/raylm:2.0.0"

    status = runner.invoke(app, ["k8s", "status", *common])
    assert status.exit_code == 0, status.output
    shown = json.loads(status.stdout)
    assert shown["name"] == "k8s-demo" and "active" in shown and "pending" in shown

    waited = runner.invoke(app, ["k8s", "wait", *common, "--timeout-s", "30", "--poll-s", "0.01"])
    assert waited.exit_code == 0, waited.output
    after = json.loads(runner.invoke(app, ["k8s", "status", *common]).stdout)
    assert after["ready"] is True
    assert after["active"]["applications"]["raylm"]["deployments"]["LLMServer"] == "HEALTHY"

    deleted = runner.invoke(app, ["k8s", "delete", *common])
    assert deleted.exit_code == 0, deleted.output
    kept = [k for k in fake_k8s.objects if k[0] != "secrets"]  # KubeRay's token Secret: the operator's
    assert kept == [("persistentvolumeclaims", NAMESPACE, "k8s-demo-storage")]  # checkpoints are kept
    missing = runner.invoke(app, ["k8s", "status", *common])
    assert missing.exit_code == 1 and "404" in missing.output


def test_cli_wait_exit_codes(helm: str, run_file: Path, kubeconfig: Path, fake_k8s: FakeKubeApi) -> None:
    common = [str(run_file), "--mode", "job", "--kubeconfig", str(kubeconfig)]
    assert runner.invoke(app, ["k8s", "apply", *common]).exit_code == 0
    fake_k8s.fail_jobs.add(job_name(run_file))
    failed = runner.invoke(app, ["k8s", "wait", *common, "--poll-s", "0.01"])
    assert failed.exit_code == 1 and "Failed/FAILED" in failed.output
    fake_k8s.stuck.add(job_name(run_file, "eval"))
    assert runner.invoke(app, ["k8s", "apply", *common, "--stage", "eval"]).exit_code == 0
    timed_out = runner.invoke(
        app, ["k8s", "wait", *common, "--stage", "eval", "--timeout-s", "0.1", "--poll-s", "0.02"]
    )
    assert timed_out.exit_code == 3 and "not ready after" in timed_out.output
    # the PVC holds checkpoints, shared by every stage: delete keeps it
    assert runner.invoke(app, ["k8s", "delete", *common]).exit_code == 0
    assert ("persistentvolumeclaims", NAMESPACE, "k8s-demo-storage") in fake_k8s.objects
