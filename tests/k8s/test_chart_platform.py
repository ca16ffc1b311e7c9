"""What a platform team needs from the chart: Ray token auth in every mode, a head NetworkPolicy, upgrades
that follow KubeRay, and the scheduling / identity / monitoring knobs, each rendered by the real
`helm template` (through `raylm k8s render`), checked against the vendored KubeRay CRDs, and each rejected
by values.schema.json and by the typed `k8s` config when wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import ConfigError, load_config
from tests.k8s.conftest import CHART, docs_of, run_helm
from tests.k8s.crd_schema import crd_errors

runner = CliRunner()
MODES = ("cluster", "job", "service")


def group(**extra: object) -> str:
    """`--set` of k8s.worker_groups (a list, so set whole) with the run file's GPU group plus `extra`."""
    g = {"name": "gpu", "replicas": 1, "min_replicas": 1, "max_replicas": 3}
    return "k8s.worker_groups=" + json.dumps([{**g, **extra}])


def rendered(run_file: Path, mode: str, *sets: str) -> dict[str, dict]:
    args = ["k8s", "render", str(run_file), "--mode", mode]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    docs = {d["kind"]: d for d in docs_of(result.stdout)}
    ray = next(d for d in docs.values() if d["apiVersion"] == "ray.io/v1")
    assert crd_errors(ray) == []
    return docs


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def ray_object(docs: dict[str, dict]) -> dict:
    return next(d for d in docs.values() if d["apiVersion"] == "ray.io/v1")


@pytest.mark.parametrize("mode", MODES)
def test_render_turns_ray_token_auth_on_in_every_mode(helm: str, run_file: Path, mode: str) -> None:
    spec = cluster_spec(ray_object(rendered(run_file, mode)))
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == "2.60.0"  # KubeRay needs Ray >= 2.52 for token auth


def test_auth_off_is_explicit_and_an_existing_secret_can_be_named(helm: str, run_file: Path) -> None:
    off = cluster_spec(ray_object(rendered(run_file, "cluster", "k8s.ray_auth.enabled=false")))
    assert off["authOptions"] == {"mode": "disabled"}
    named = cluster_spec(ray_object(rendered(run_file, "service", "k8s.ray_auth.secret_name=ray-token")))
    assert named["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    with pytest.raises(ConfigError, match="ray_auth needs Ray >= 2.52.0"):
        load_config(run_file, ["k8s.ray_version=2.40.0"])
    proc = run_helm(helm, "template", str(CHART), "--set", "rayAuth.enabled=maybe", check=False)
    assert proc.returncode != 0 and "/rayAuth/enabled" in proc.stderr


def test_network_policy_admits_head_ports_only_from_own_pods_and_clients(helm: str, run_file: Path) -> None:
    assert "NetworkPolicy" not in rendered(run_file, "cluster")
    docs = rendered(
        run_file,
        "service",
        "k8s.network_policy.enabled=true",
        'k8s.network_policy.clients=[{"pod_labels": {"app": "notebook"}}]',
    )
    policy = docs["NetworkPolicy"]["spec"]
    head = cluster_spec(docs["RayService"])["headGroupSpec"]["template"]["metadata"]["labels"]
    selector = policy["podSelector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "raylm",
        "app.kubernetes.io/instance": "k8s-demo",
        "ray.io/node-type": "head",  # set by KubeRay on the head pod
    }
    assert all(head[k] == v for k, v in selector.items() if k != "ray.io/node-type")
    own, clients, serve = policy["ingress"]
    assert own == {
        "from": [
            {"podSelector": {"matchLabels": {k: v for k, v in selector.items() if k != "ray.io/node-type"}}}
        ]
    }
    assert clients["from"] == [{"podSelector": {"matchLabels": {"app": "notebook"}}}]
    assert {p["port"] for p in clients["ports"]} == {6379, 8265, 10001}
    assert serve == {"ports": [{"port": 8000, "protocol": "TCP"}]}  # the endpoint checks API keys itself
    monitored = rendered(
        run_file, "cluster", "k8s.network_policy.enabled=true", "k8s.pod_monitor.enabled=true"
    )
    assert monitored["NetworkPolicy"]["spec"]["ingress"][2]["ports"][1] == {"port": 8080, "protocol": "TCP"}
    default = rendered(run_file, "cluster", "k8s.network_policy.enabled=true")["NetworkPolicy"]
    assert default["spec"]["ingress"][1]["from"] == [
        {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
            "namespaceSelector": {},
        }
    ]


def test_incremental_upgrade_strategy_renders_gateway_options(helm: str, run_file: Path) -> None:
    docs = rendered(
        run_file,
        "service",
        "k8s.upgrade_strategy.type=NewClusterWithIncrementalUpgrade",
        "k8s.upgrade_strategy.step_size_percent=25",
        "k8s.upgrade_strategy.interval_s=60",
        "k8s.upgrade_strategy.gateway_class_name=istio",
        "k8s.endpoint.ingress.enabled=false",
    )
    assert docs["RayService"]["spec"]["upgradeStrategy"] == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {
            "maxSurgePercent": 100,
            "stepSizePercent": 25,
            "intervalSeconds": 60,
            "gatewayClassName": "istio",
        },
    }
    proc = run_helm(
        helm,
        "template",
        str(CHART),
        "-f",
        str(CHART / "ci" / "service-values.yaml"),
        "--set",
        "upgradeStrategy.type=NewClusterWithIncrementalUpgrade",
        "--set",
        "upgradeStrategy.clusterUpgradeOptions.stepSizePercent=10",
        "--set",
        "upgradeStrategy.clusterUpgradeOptions.intervalSeconds=10",
        "--set",
        "upgradeStrategy.clusterUpgradeOptions.gatewayClassName=istio",
        check=False,
    )
    assert proc.returncode != 0 and "the Gateway KubeRay creates (<name>-gateway)" in proc.stderr
    none = rendered(run_file, "service", "k8s.upgrade_strategy.type=None")["RayService"]
    assert none["spec"]["upgradeStrategy"] == {"type": "None"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["k8s.upgrade_strategy.type=NewClusterWithIncrementalUpgrade"], "needs step_size_percent"),
        (
            [
                "k8s.upgrade_strategy.type=NewClusterWithIncrementalUpgrade",
                "k8s.upgrade_strategy.step_size_percent=50",
                "k8s.upgrade_strategy.max_surge_percent=20",
                "k8s.upgrade_strategy.interval_s=10",
                "k8s.upgrade_strategy.gateway_class_name=istio",
                "k8s.endpoint.ingress.enabled=false",
            ],
            "step_size_percent must be <= max_surge_percent",
        ),
        (["k8s.upgrade_strategy.type=Blue"], "upgrade_strategy.type"),
        ([group(idle_timeout_s=30)], "idle_timeout_s needs autoscaler v2"),
        (["k8s.job.shutdown_after_finishes=false", "k8s.job.ttl_seconds_after_finished=60"], "shutdown"),
        (['k8s.head.ray_start_params={"redis-password": "x"}'], "gcs_fault_tolerance"),
        (['k8s.service_account.annotations={"a": "b"}'], "set create"),
        (['k8s.head.volumes=[{"name": "dshm", "emptyDir": {}}]'], "the chart's own"),
        (['k8s.head.env=[{"name": "X"}]'], "exactly one of value and value_from"),
        (["k8s.kueue_queue=Team_A"], "kueue_queue"),
        (["k8s.pod_monitor.interval=often"], "pod_monitor.interval"),
        (['k8s.job.deletion_strategy={"onSucces": {}}'], "unknown keys"),
    ],
)
def test_k8s_config_rejects_bad_knobs_naming_the_field(
    run_file: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(run_file, overrides)


def test_cluster_knobs_reach_every_pod(helm: str, run_file: Path) -> None:
    affinity = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
            ]
        }
    }
    spread = [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    ]
    docs = rendered(
        run_file,
        "job",
        "k8s.priority_class_name=training",
        "k8s.scheduler_name=volcano",
        "k8s.runtime_class_name=nvidia",
        "k8s.kueue_queue=team-a",
        group(
            affinity=affinity,
            topology_spread_constraints=spread,
            env=[
                {"name": "NCCL_DEBUG", "value": "WARN"},
                {"name": "HF_TOKEN", "value_from": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            ],
            env_from=[{"secretRef": {"name": "s3-creds"}}],
            volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "corpus"}}],
            volume_mounts=[{"name": "data", "mountPath": "/data", "readOnly": True}],
        ),
        "k8s.service_account.create=true",
        'k8s.service_account.annotations={"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/raylm"}',
    )
    job = docs["RayJob"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = cluster_spec(job)
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    for pod in (head, worker, job["spec"]["submitterPodTemplate"]["spec"]):
        assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    for pod in (head, worker):
        assert (pod["priorityClassName"], pod["schedulerName"], pod["runtimeClassName"]) == (
            "training",
            "volcano",
            "nvidia",
        )
    assert docs["ServiceAccount"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/raylm"
    }
    assert worker["affinity"] == affinity and worker["topologySpreadConstraints"] == spread
    assert "affinity" not in head  # per group
    container = worker["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "RAYLM_API_KEYS" in env  # the chart's own env stays
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "corpus"}} in worker["volumes"]
    assert {"run-config", "dshm", "storage", "data"} == {v["name"] for v in worker["volumes"]}


def test_autoscaler_v2_with_group_idle_timeout_and_service_head_without_cpus(
    helm: str, run_file: Path
) -> None:
    spec = cluster_spec(
        rendered(run_file, "service", "k8s.autoscaler.version=v2", group(idle_timeout_s=300))["RayService"]
    )
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["workerGroupSpecs"][0]["idleTimeoutSeconds"] == 300
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # Serve replicas go to workers
    cluster = cluster_spec(rendered(run_file, "cluster")["RayCluster"])
    assert "num-cpus" not in cluster["headGroupSpec"]["rayStartParams"]
    assert cluster["autoscalerOptions"]["version"] == "v1"  # KubeRay's default
    own = cluster_spec(
        rendered(run_file, "service", 'k8s.head.ray_start_params={"num-cpus": "2"}')["RayService"]
    )
    assert own["headGroupSpec"]["rayStartParams"]["num-cpus"] == "2"


def test_gcs_fault_tolerance_username_and_storage_namespace(helm: str, run_file: Path) -> None:
    spec = cluster_spec(
        rendered(
            run_file,
            "service",
            "k8s.gcs_fault_tolerance.enabled=true",
            "k8s.gcs_fault_tolerance.redis_address=redis:6379",
            'k8s.gcs_fault_tolerance.redis_username_secret={"name": "redis", "key": "user"}',
            'k8s.gcs_fault_tolerance.redis_password_secret={"name": "redis", "key": "password"}',
            "k8s.gcs_fault_tolerance.external_storage_namespace=chat-prod",
        )["RayService"]
    )
    gcs = spec["gcsFaultToleranceOptions"]
    assert gcs["redisUsername"] == {"valueFrom": {"secretKeyRef": {"name": "redis", "key": "user"}}}
    assert gcs["externalStorageNamespace"] == "chat-prod"


def test_pod_monitor_scrapes_ray_and_the_endpoint(helm: str, run_file: Path) -> None:
    docs = rendered(
        run_file, "service", "k8s.pod_monitor.enabled=true", 'k8s.pod_monitor.labels={"release": "prom"}'
    )
    monitor = docs["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    ray_port, endpoint = monitor["spec"]["podMetricsEndpoints"]
    assert ray_port["port"] == "metrics" and endpoint["port"] == "serve" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "raylm-api-keys", "key": "api-keys"}
    head = cluster_spec(docs["RayService"])["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 8080} in head["ports"]
    labels = cluster_spec(docs["RayService"])["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert (
        len(
            rendered(run_file, "job", "k8s.pod_monitor.enabled=true")["PodMonitor"]["spec"][
                "podMetricsEndpoints"
            ]
        )
        == 1
    )


@pytest.mark.parametrize(
    ("sets", "path"),
    [
        (["upgradeStrategy.type=Rolling"], "/upgradeStrategy/type"),
        (["upgradeStrategy.type=NewClusterWithIncrementalUpgrade"], "/upgradeStrategy/clusterUpgradeOptions"),
        (["autoscaler.version=v3"], "/autoscaler/version"),
        (["workerGroups[0].idleTimeoutSeconds=-1"], "/workerGroups/0/idleTimeoutSeconds"),
        (
            ["workerGroups[0].topologySpreadConstraints[0].maxSkew=1"],
            "/workerGroups/0/topologySpreadConstraints/0",
        ),
        (["head.env[0].name=X"], "/head/env/0"),
        (["head.volumes[0].name=dshm", "head.volumes[0].emptyDir.medium=Memory"], "/head/volumes/0/name"),
        (["head.volumeMounts[0].name=x", "head.volumeMounts[0].mountPath=relative"], "/head/volumeMounts/0"),
        (["networkPolicy.clients[0].namespaceSelectr.x=y"], "/networkPolicy/clients/0"),
        (["kueueQueue=Team_A"], "/kueueQueue"),
        (["serviceAccount.annotations.a=1"], "/serviceAccount/annotations/a"),
        (["podMonitor.interval=soon"], "/podMonitor/interval"),
        (["gcsFaultTolerance.redisUsernameSecret.user=x"], "/gcsFaultTolerance/redisUsernameSecret"),
        (["job.deletionStrategy.onSucces.policy=DeleteSelf"], "/job/deletionStrategy"),
    ],
)
def test_values_schema_rejects_bad_knobs(helm: str, sets: list[str], path: str) -> None:
    args = ["template", str(CHART), "--set", "mode=service"]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args, check=False)
    assert proc.returncode != 0, proc.stdout[:200]
    assert path in proc.stderr, proc.stderr


def test_ci_values_exercise_the_platform_knobs(helm: str) -> None:
    """The ci/ files a platform team starts from show the new knobs, and they lint and validate."""
    docs = docs_of(
        run_helm(helm, "template", "ci", str(CHART), "-f", str(CHART / "ci" / "cluster-values.yaml")).stdout
    )
    kinds = {d["kind"] for d in docs}
    assert {"NetworkPolicy", "ServiceAccount", "PodMonitor"} <= kinds
    ray = next(d for d in docs if d["kind"] == "RayCluster")
    assert crd_errors(ray) == []
    assert ray["spec"]["autoscalerOptions"]["version"] == "v2"
