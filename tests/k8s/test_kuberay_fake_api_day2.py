"""Day-2 work against the FAKE API server (tests/k8s/fake_k8s_api.py): server-side apply that does not clobber
what the autoscaler or others set, RayJob re-runs, scale / suspend / resume, waiting for a running job,
rollbacks, operator rejections surfacing at once, and the Ray token read from KubeRay's Secret."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster import auth
from cluster.cli import app
from cluster.config import load_config
from cluster.k8s_render import release_name, render
from cluster.kuberay import (
    ConflictError,
    InvalidError,
    JobAlreadyFinishedError,
    Kind,
    KubeRayClient,
    ManifestApplier,
    NotFoundError,
    OperatorRejectedError,
    RayServiceStatus,
)
from tests.k8s.conftest import NAMESPACE, docs_of
from tests.k8s.fake_k8s_api import FakeKubeApi

runner = CliRunner()


def docs(run_file: Path, mode: str, *overrides: str, stage: str = "train") -> list[dict]:
    return docs_of(render(load_config(run_file, list(overrides)), mode, stage))


def ray_doc(run_file: Path, mode: str, *overrides: str) -> dict:
    return next(d for d in docs(run_file, mode, *overrides) if d["apiVersion"] == "ray.io/v1")


def gpu_group(obj: dict) -> dict:
    return obj["spec"]["workerGroupSpecs"][0]


def managers(obj: dict) -> set[str]:
    return {m["manager"] for m in obj["metadata"]["managedFields"]}


def test_fake_reapply_keeps_the_autoscalers_replicas_and_workers_to_delete(
    helm: str, run_file: Path, kuberay: KubeRayClient, fake_k8s: FakeKubeApi
) -> None:
    kuberay.apply(ray_doc(run_file, "cluster"))
    fake_k8s.autoscale(NAMESPACE, "k8s-demo", "gpu", replicas=3, delete=["k8s-demo-gpu-worker-abc"])
    again = kuberay.apply(ray_doc(run_file, "cluster"))  # the same run file, re-applied
    assert gpu_group(again)["replicas"] == 3
    assert gpu_group(again)["scaleStrategy"] == {"workersToDelete": ["k8s-demo-gpu-worker-abc"]}
    assert managers(again) == {"raylm", "autoscaler"}


def test_fake_apply_conflicts_with_another_managers_change_unless_forced(
    helm: str, run_file: Path, kuberay: KubeRayClient, fake_k8s: FakeKubeApi
) -> None:
    kuberay.apply(ray_doc(run_file, "cluster"))
    fake_k8s.autoscale(NAMESPACE, "k8s-demo", "gpu", replicas=2, delete=[])
    changed = ray_doc(run_file, "cluster", "k8s.image.tag=2.0.0")
    with pytest.raises(ConflictError) as err:
        kuberay.apply(changed)
    assert err.value.status == 409
    assert 'conflict with "autoscaler": .spec.workerGroupSpecs' in str(err.value) and "--force" in str(
        err.value
    )
    live = kuberay.get(Kind.RAY_CLUSTER, "k8s-demo")
    assert gpu_group(live)["template"]["spec"]["containers"][0]["image"].endswith(":1.2.3")  # nothing written
    forced = kuberay.apply(changed, force=True)
    assert gpu_group(forced)["template"]["spec"]["containers"][0]["image"].endswith(":2.0.0")
    assert gpu_group(forced)["replicas"] == 2  # forcing takes the fields over but keeps the scaling state
    assert managers(forced) == {"raylm"}


def test_fake_apply_keeps_fields_others_set_and_drops_what_raylm_stopped_setting(
    helm: str, run_file: Path, kuberay: KubeRayClient
) -> None:
    kuberay.apply(ray_doc(run_file, "cluster", 'k8s.labels={"cost-center": "42"}'))
    kuberay.patch(Kind.RAY_CLUSTER, "k8s-demo", {"metadata": {"annotations": {"owner": "alice"}}})
    again = kuberay.apply(ray_doc(run_file, "cluster"))  # the label is no longer in the run file
    assert again["metadata"]["annotations"] == {"owner": "alice"}  # someone else's: kept
    assert "cost-center" not in again["metadata"]["labels"]  # raylm's own, no longer applied: removed


def test_fake_reapply_leaves_a_bound_pvc_alone(
    helm: str, run_file: Path, kuberay: KubeRayClient, fake_k8s: FakeKubeApi
) -> None:
    applier = ManifestApplier(kuberay)
    applier.apply(docs(run_file, "cluster"))
    pvc = ("persistentvolumeclaims", NAMESPACE, "k8s-demo-storage")
    version = fake_k8s.objects[pvc]["metadata"]["resourceVersion"]
    applier.apply(docs(run_file, "cluster", "k8s.image.tag=2.0.0"))  # a re-apply: the PVC is unchanged
    assert fake_k8s.objects[pvc]["metadata"]["resourceVersion"] == version
    applier.apply(docs(run_file, "cluster", "k8s.storage.pvc_size=80Gi"))  # growing a claim is allowed
    assert fake_k8s.objects[pvc]["spec"]["resources"]["requests"]["storage"] == "80Gi"
    with pytest.raises(InvalidError, match="immutable"):
        applier.apply(docs(run_file, "cluster", "k8s.storage.storage_class_name=fast"))
    assert all(method != "PUT" for method, _ in fake_k8s.requests)


def test_fake_finished_rayjob_is_not_reported_again_and_a_changed_config_is_a_new_run(
    helm: str, run_file: Path, kubeconfig: Path, fake_k8s: FakeKubeApi
) -> None:
    common = [str(run_file), "--mode", "job", "--kubeconfig", str(kubeconfig)]
    assert runner.invoke(app, ["k8s", "apply", *common]).exit_code == 0
    assert runner.invoke(app, ["k8s", "wait", *common, "--poll-s", "0.01"]).exit_code == 0
    again = runner.invoke(app, ["k8s", "apply", *common])
    assert again.exit_code == 1
    assert "already ran with this exact config and finished as Complete/SUCCEEDED" in " ".join(
        again.output.split()
    )
    changed = runner.invoke(app, ["k8s", "apply", *common, "--set", "train.max_steps=7"])
    assert changed.exit_code == 0, changed.output
    jobs = sorted(name for plural, _, name in fake_k8s.objects if plural == "rayjobs")
    first = release_name(load_config(run_file), "job")
    second = release_name(load_config(run_file, ["train.max_steps=7"]), "job")
    assert first != second and jobs == sorted([first, second])
    status = runner.invoke(app, ["k8s", "status", *common, "--set", "train.max_steps=7"])
    shown = json.loads(status.stdout)
    assert shown["name"] == second and shown["deployment_status"] != "Complete"  # the new run, not the old


def test_fake_finished_rayjob_apply_raises_typed_error(
    helm: str, run_file: Path, kuberay: KubeRayClient
) -> None:
    job = ray_doc(run_file, "job")
    kuberay.apply(job)
    kuberay.wait(Kind.RAY_JOB, job["metadata"]["name"], timeout_s=30, poll_s=0.01)
    with pytest.raises(JobAlreadyFinishedError, match="delete it"):
        kuberay.apply(job)


def test_fake_scale_a_worker_group(helm: str, run_file: Path, kuberay: KubeRayClient) -> None:
    kuberay.apply(ray_doc(run_file, "cluster"))
    scaled = kuberay.scale("k8s-demo", "gpu", replicas=4, max_replicas=6)
    assert (
        gpu_group(scaled)["replicas"],
        gpu_group(scaled)["minReplicas"],
        gpu_group(scaled)["maxReplicas"],
    ) == (
        4,
        1,
        6,
    )
    assert "raylm-cli" in managers(scaled)
    with pytest.raises(InvalidError, match="minReplicas <= replicas <= maxReplicas"):
        kuberay.scale("k8s-demo", "gpu", replicas=9)
    with pytest.raises(NotFoundError, match="no worker group 'tpu'; groups: gpu"):
        kuberay.scale("k8s-demo", "tpu", replicas=1)


def test_fake_suspend_and_resume_a_rayjob(helm: str, run_file: Path, kuberay: KubeRayClient) -> None:
    job = ray_doc(run_file, "job")
    name = job["metadata"]["name"]
    kuberay.apply(job)
    assert kuberay.suspend(name)["spec"]["suspend"] is True
    assert kuberay.resume(name)["spec"]["suspend"] is False
    keep = ray_doc(run_file, "job", "k8s.job.shutdown_after_finishes=false")
    kuberay.apply(keep)
    with pytest.raises(InvalidError, match="cannot suspend a RayJob with shutdownAfterJobFinishes: false"):
        kuberay.suspend(keep["metadata"]["name"])


def test_fake_wait_until_a_rayjob_runs(helm: str, run_file: Path, kuberay: KubeRayClient) -> None:
    job = ray_doc(run_file, "job")
    kuberay.apply(job)
    running = kuberay.wait(Kind.RAY_JOB, job["metadata"]["name"], timeout_s=30, poll_s=0.01, until="running")
    assert running.deployment_status == "Running" and running.job_status == "RUNNING"
    assert not running.finished
    with pytest.raises(ValueError, match="'running' for a RayJob"):
        kuberay.wait(Kind.RAY_SERVICE, "k8s-demo", timeout_s=1, until="running")


def test_fake_rayservice_rolling_back_counts_as_upgrading(
    helm: str, run_file: Path, kuberay: KubeRayClient, fake_k8s: FakeKubeApi
) -> None:
    fake_k8s.rolling_back.add("k8s-demo")
    kuberay.apply(ray_doc(run_file, "service"))
    status = kuberay.wait(Kind.RAY_SERVICE, "k8s-demo", timeout_s=30, poll_s=0.01)
    assert isinstance(status, RayServiceStatus)
    assert status.ready and status.rolling_back and status.upgrading
    assert status.pending.applications["raylm"].status == "DEPLOY_FAILED"


@pytest.mark.parametrize("mode", ["cluster", "job", "service"])
def test_fake_operator_rejection_surfaces_instead_of_a_timeout(
    helm: str, run_file: Path, kuberay: KubeRayClient, mode: str
) -> None:
    obj = ray_doc(run_file, mode)
    spec = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig") or obj["spec"]
    spec["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=2)  # schema-valid, operator-invalid
    kuberay.apply(obj)
    kind = Kind.parse(obj["kind"])
    with pytest.raises(OperatorRejectedError) as err:
        kuberay.wait(kind, obj["metadata"]["name"], timeout_s=20, poll_s=0.01)
    assert f"KubeRay rejected {obj['kind']}" in str(err.value)
    assert "minReplicas 3 greater than maxReplicas 2" in str(err.value)


def test_fake_ray_token_from_kuberays_secret(
    helm: str,
    run_file: Path,
    kuberay: KubeRayClient,
    kubeconfig: Path,
    fake_k8s: FakeKubeApi,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    kuberay.apply(ray_doc(run_file, "cluster"))
    kuberay.wait(Kind.RAY_CLUSTER, "k8s-demo", timeout_s=30, poll_s=0.01)
    secret = fake_k8s.objects[("secrets", NAMESPACE, "k8s-demo")]  # what the operator created
    expected = base64.b64decode(secret["data"]["auth_token"]).decode()
    assert kuberay.ray_token(Kind.RAY_CLUSTER, "k8s-demo") == expected

    cli = runner.invoke(app, ["k8s", "token", str(run_file), "--kubeconfig", str(kubeconfig)])
    assert cli.exit_code == 0 and cli.stdout.strip() == expected

    # `raylm submit` (cluster.auth) falls back to the Secret for a KubeRay head Service address.
    for var in (auth.TOKEN_ENV, auth.TOKEN_PATH_ENV, auth.AUTH_MODE_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    token = auth.client_token(f"http://k8s-demo-head-svc.{NAMESPACE}.svc.cluster.local:8265")
    assert token is not None and token.value == expected
    assert token.origin == f"KubeRay Secret of RayCluster {NAMESPACE}/k8s-demo"
    assert auth.client_token("http://127.0.0.1:8265") is None  # not a KubeRay address: nothing to look up


def test_fake_ray_token_of_job_cluster_and_auth_off(
    helm: str, run_file: Path, kuberay: KubeRayClient, kubeconfig: Path, fake_k8s: FakeKubeApi
) -> None:
    job = ray_doc(run_file, "job")
    kuberay.apply(job)
    status = kuberay.wait(Kind.RAY_JOB, job["metadata"]["name"], timeout_s=30, poll_s=0.01, until="running")
    secret = fake_k8s.objects[("secrets", NAMESPACE, status.cluster_name)]
    token = kuberay.ray_token(Kind.RAY_JOB, job["metadata"]["name"])
    assert token == base64.b64decode(secret["data"]["auth_token"]).decode()
    kuberay.apply(ray_doc(run_file, "cluster", "k8s.ray_auth.enabled=false"))
    assert kuberay.ray_token(Kind.RAY_CLUSTER, "k8s-demo") is None
    off = runner.invoke(
        app,
        [
            "k8s",
            "token",
            str(run_file),
            "--kubeconfig",
            str(kubeconfig),
            "--set",
            "k8s.ray_auth.enabled=false",
        ],
    )
    assert off.exit_code == 1 and "without Ray token auth" in off.output


def test_fake_cli_applies_and_deletes_every_kind_the_chart_renders(
    helm: str, run_file: Path, kubeconfig: Path, fake_k8s: FakeKubeApi
) -> None:
    common = [
        str(run_file),
        "--kubeconfig",
        str(kubeconfig),
        "--set",
        "k8s.network_policy.enabled=true",
        "--set",
        "k8s.service_account.create=true",
        "--set",
        "k8s.pod_monitor.enabled=true",
    ]
    result = runner.invoke(app, ["k8s", "apply", *common])
    assert result.exit_code == 0, result.output
    plurals = {p for p, _, _ in fake_k8s.objects}
    assert {"networkpolicies", "serviceaccounts", "podmonitors", "rayclusters", "configmaps"} <= plurals
    assert runner.invoke(app, ["k8s", "delete", *common]).exit_code == 0
    left = {p for p, _, _ in fake_k8s.objects}
    assert left == {"persistentvolumeclaims", "secrets"}
