"""The Helm chart: lint, render every mode, validate against the KubeRay v1.7.0 CRDs, reject bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.run_stage import RUNNER_MODULE
from data_pipelines.layout import RUNNABLE_STAGES
from serve.config import ServeConfig
from serve.options import app_deployments
from tests.k8s.conftest import CHART, docs_of, run_helm
from tests.k8s.crd_schema import CRD_DIR, crd_errors

MODES = ("cluster", "job", "service")
EXPECTED_KINDS = {
    "cluster": {"ConfigMap", "RayCluster", "ServiceAccount", "NetworkPolicy", "PodMonitor"},
    "job": {"ConfigMap", "RayJob", "PersistentVolumeClaim"},
    "service": {"ConfigMap", "RayService", "Ingress"},
}
BAD_VALUES = Path(__file__).parent / "data" / "bad-values.yaml"


def ci_values(mode: str) -> Path:
    return CHART / "ci" / f"{mode}-values.yaml"


def test_one_ci_values_file_per_mode() -> None:
    assert sorted(p.name for p in (CHART / "ci").glob("*.yaml")) == [
        f"{m}-values.yaml" for m in sorted(MODES)
    ]
    assert CRD_DIR.is_dir(), f"KubeRay CRDs not found at {CRD_DIR}"


@pytest.mark.parametrize("mode", MODES)
def test_helm_lint_ci_values(helm: str, mode: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(ci_values(mode)))
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("mode", MODES)
def test_template_renders_mode_and_validates_against_crds(helm: str, mode: str) -> None:
    docs = docs_of(run_helm(helm, "template", "ci", str(CHART), "-f", str(ci_values(mode))).stdout)
    assert {d["kind"] for d in docs} == EXPECTED_KINDS[mode]
    ray = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    assert len(ray) == 1
    assert crd_errors(ray[0]) == []


@pytest.mark.parametrize("mode", MODES)
def test_default_values_validate_against_crds(helm: str, mode: str) -> None:
    docs = docs_of(run_helm(helm, "template", "dflt", str(CHART), "--set", f"mode={mode}").stdout)
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            assert crd_errors(doc) == [], doc["kind"]


def test_crd_validation_catches_a_bad_manifest(helm: str) -> None:
    """Guard against a validator that accepts anything: a typo and a wrong type must both be reported."""
    doc = docs_of(run_helm(helm, "template", "ci", str(CHART), "-f", str(ci_values("cluster"))).stdout)[-1]
    doc["spec"]["enableInTreeAutoscalling"] = True
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    errors = crd_errors(doc)
    assert any("enableInTreeAutoscalling" in e for e in errors)
    assert any(e.startswith("spec.workerGroupSpecs.0.maxReplicas") for e in errors)


@pytest.mark.parametrize("command", ["lint", "template"])
def test_values_with_wrong_type_rejected_by_schema(helm: str, command: str) -> None:
    proc = run_helm(helm, command, str(CHART), "-f", str(BAD_VALUES), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "/workerGroups/0/replicas" in out and "want integer" in out


def test_unknown_mode_and_stage_rejected(helm: str) -> None:
    proc = run_helm(helm, "template", str(CHART), "--set", "mode=batch", check=False)
    assert proc.returncode != 0 and "/mode" in proc.stderr
    proc = run_helm(
        helm, "template", str(CHART), "--set", "mode=job", "--set", "job.stage=deploy", check=False
    )
    assert proc.returncode != 0
    allowed = "allowed: tokens, pretrain, finetune, eval, export"
    assert f'job.stage "deploy" is not a stage; {allowed}' in proc.stderr


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    return pods


@pytest.mark.parametrize("mode", MODES)
def test_pods_run_non_root_with_restricted_security_context(helm: str, mode: str) -> None:
    doc = next(
        d
        for d in docs_of(run_helm(helm, "template", "ci", str(CHART), "-f", str(ci_values(mode))).stdout)
        if d["apiVersion"] == "ray.io/v1"
    )
    pods = _pod_specs(doc)
    assert len(pods) >= 2
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] == c["resources"]["limits"]


def test_cluster_mode_autoscaler_groups_and_scheduling(helm: str) -> None:
    doc = docs_of(run_helm(helm, "template", "ci", str(CHART), "-f", str(ci_values("cluster"))).stdout)[-1]
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] == "Conservative"
    assert spec["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    gpu, cpu = spec["workerGroupSpecs"]
    assert (gpu["groupName"], gpu["minReplicas"], gpu["maxReplicas"]) == ("gpu", 0, 8)
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "storage", "persistentVolumeClaim": {"claimName": "raylm-checkpoints"}} in pod["volumes"]
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_job_mode_lifecycle_fields(helm: str) -> None:
    docs = docs_of(run_helm(helm, "template", "ci", str(CHART), "-f", str(ci_values("job"))).stdout)
    job = next(d for d in docs if d["kind"] == "RayJob")["spec"]
    assert job["entrypoint"] == "python -m cluster.run_stage pretrain --config /etc/raylm/run.yaml"
    assert (job["shutdownAfterJobFinishes"], job["ttlSecondsAfterFinished"]) == (True, 300)
    assert (job["backoffLimit"], job["activeDeadlineSeconds"]) == (1, 7200)
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"env_vars": {"NCCL_DEBUG": "WARN"}}
    assert job["rayClusterSpec"]["enableInTreeAutoscaling"] is False
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["run.yaml"])["cluster"]["run_name"] == "ci"
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_job_keeping_its_cluster_has_no_ttl(helm: str) -> None:
    """KubeRay rejects ttlSecondsAfterFinished on a RayJob with shutdownAfterJobFinishes=false."""
    args = [
        "template",
        "ci",
        str(CHART),
        "-f",
        str(ci_values("job")),
        "--set",
        "job.shutdownAfterJobFinishes=false",
    ]
    job = next(d for d in docs_of(run_helm(helm, *args).stdout) if d["kind"] == "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in job


def test_service_mode_endpoint_ingress_secrets_and_gcs_ft(helm: str) -> None:
    docs = {
        d["kind"]: d
        for d in docs_of(run_helm(helm, "template", "ci", str(CHART), "-f", str(ci_values("service"))).stdout)
    }
    ing, rs = docs["Ingress"], docs["RayService"]
    # The endpoint is KubeRay's own serve Service: it selects the cluster KubeRay switched traffic to, so
    # it never reaches a pending cluster mid-upgrade (a raylm-label selector would).
    assert "Service" not in docs
    serve_svc = rs["spec"]["serveService"]
    assert "name" not in serve_svc.get("metadata", {}) and "selector" not in serve_svc["spec"]
    assert serve_svc["spec"]["type"] == "ClusterIP"
    port = {"name": "serve", "port": 8000, "targetPort": "serve", "protocol": "TCP"}
    assert serve_svc["spec"]["ports"] == [port]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert {"name": "serve", "containerPort": 8000} in head["spec"]["containers"][0]["ports"]
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "llm.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "ci-serve-svc", "port": {"name": "serve"}}
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert ing["spec"]["tls"] == [{"secretName": "llm-example-tls", "hosts": ["llm.example.com"]}]
    env = {e["name"]: e for e in head["spec"]["containers"][0]["env"]}
    assert env["RAYLM_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "raylm-api-keys", "key": "api-keys"}
    gcs = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] == "redis.raylm.svc.cluster.local:6379"
    assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "redis-password", "key": "password"}


def test_chart_defaults_match_the_python_mappings() -> None:
    """A hand-installed chart must run the same commands and Serve options as `raylm` would."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (values["stageRunner"], values["stages"]) == (RUNNER_MODULE, list(RUNNABLE_STAGES))
    serve = ServeConfig.model_validate(values["serve"])
    assert values["serveDeployments"] == app_deployments(serve)
