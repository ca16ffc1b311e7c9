"""`raylm k8s render`: the run file -> chart -> manifests, with the RayJob entrypoint and serveConfigV2
proven equal to what the local commands use (cluster.run_stage, serve.options)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import load_config
from cluster.k8s_render import CHART_DIR, chart_values, pod_config, release_name
from cluster.run_stage import RUNNER_MODULE, entrypoint
from data_pipelines.layout import RUNNABLE_STAGES, STAGE_ALIASES
from serve.options import app_deployments
from tests.k8s.conftest import NAMESPACE, docs_of, run_helm
from tests.k8s.crd_schema import crd_errors

runner = CliRunner()


def render_cli(*args: str) -> str:
    result = runner.invoke(app, ["k8s", "render", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def by_kind(text: str) -> dict[str, dict]:
    return {d["kind"]: d for d in docs_of(text)}


@pytest.mark.parametrize("mode", ["job", "service", "cluster"])
def test_render_equals_helm_template_of_the_chart(
    helm: str, run_file: Path, tmp_path: Path, mode: str
) -> None:
    out = tmp_path / "out.yaml"
    result = runner.invoke(app, ["k8s", "render", str(run_file), "--mode", mode, "-o", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(run_file)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(cfg, mode)))
    direct = run_helm(
        helm, "template", release_name(cfg, mode), str(CHART_DIR), "-n", NAMESPACE, "-f", str(values)
    ).stdout
    assert out.read_text() == direct
    for doc in docs_of(direct):
        assert doc["metadata"]["namespace"] == NAMESPACE
        if doc["apiVersion"] == "ray.io/v1":
            assert crd_errors(doc) == []


@pytest.mark.parametrize("stage", [str(s) for s in RUNNABLE_STAGES])
def test_rayjob_entrypoint_is_the_submit_entrypoint(helm: str, run_file: Path, stage: str) -> None:
    docs = by_kind(render_cli(str(run_file), "--mode", "job", "--stage", stage))
    job = docs["RayJob"]
    assert re.fullmatch(f"k8s-demo-{stage}-[0-9a-f]{{6}}", job["metadata"]["name"])
    assert job["spec"]["entrypoint"] == entrypoint(stage, "/etc/raylm/run.yaml")
    assert job["metadata"]["labels"]["raylm.dev/stage"] == stage
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts["run-config"] == "/etc/raylm"
    cm_volume = next(v for v in head["volumes"] if v["name"] == "run-config")
    assert cm_volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]


def test_mounted_run_config_is_the_typed_config_for_pods(helm: str, run_file: Path) -> None:
    docs = by_kind(render_cli(str(run_file), "--mode", "job"))
    mounted = yaml.safe_load(docs["ConfigMap"]["data"]["run.yaml"])
    cfg = load_config(run_file)
    assert mounted == pod_config(cfg).model_dump(mode="json")
    assert mounted["cluster"]["storage_path"] == "/mnt/raylm/runs"  # relative path moved onto the PVC
    assert mounted["cluster"]["address"] == "auto"
    spec = docs["RayJob"]["spec"]
    assert spec["entrypointNumCpus"] == 1
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": {"HF_HUB_OFFLINE": "1"}}
    assert docs["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "50Gi"


def test_serve_config_matches_serve_options_and_ray_serve_schema(helm: str, run_file: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    docs = by_kind(render_cli(str(run_file), "--mode", "service"))
    serve_cfg = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    cfg = load_config(run_file)
    (app_cfg,) = serve_cfg["applications"]
    assert app_cfg["import_path"] == "serve.app:build_app"
    assert app_cfg["deployments"] == app_deployments(cfg.serve)
    llm = app_cfg["deployments"][0]
    assert (llm["name"], llm["autoscaling_config"]["max_replicas"]) == ("LLMServer", 3)
    assert llm["autoscaling_config"]["target_ongoing_requests"] == 4
    expected_args = {k: v for k, v in cfg.serve.model_dump(mode="json").items() if v is not None}
    expected_args["model_path"] = "/mnt/raylm/runs/k8s_demo/export"
    assert app_cfg["args"] == {"model_path": "/mnt/raylm/runs/k8s_demo/export", "serve": expected_args}
    assert json.dumps(app_cfg["args"]["serve"]["max_body_bytes"]) == "1000000"  # no float/scientific drift


def test_serve_config_rejected_when_invalid() -> None:
    """ServeDeploySchema is a real check: a bad option is refused (so the test above can fail)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    bad = {
        "applications": [
            {
                "import_path": "serve.app:build_app",
                "deployments": [{"name": "LLMServer", "max_ongoing_requests": -3}],
            }
        ]
    }
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(bad)


def test_serve_import_path_builds_the_raylm_app_from_rendered_args(
    helm: str, run_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import path resolves to the real builder, and it accepts the args the chart renders."""
    from ray._common.utils import import_attr
    from ray.serve import Application

    serve_cfg = yaml.safe_load(
        by_kind(render_cli(str(run_file), "--mode", "service"))["RayService"]["spec"]["serveConfigV2"]
    )
    (app_cfg,) = serve_cfg["applications"]
    build_app = import_attr(app_cfg["import_path"])
    monkeypatch.setenv(
        load_config(run_file).serve.api_keys_env, "sk-test"
    )  # what the Secret provides in pods
    assert isinstance(build_app(app_cfg["args"]), Application)


def test_render_set_overrides_reach_the_manifests(helm: str, run_file: Path) -> None:
    text = render_cli(
        str(run_file), "--mode", "service", "--set", "k8s.image.tag=9.9.9", "--set", "serve.max_replicas=7"
    )
    rs = by_kind(text)["RayService"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "registry.example.com/raylm:9.9.9"
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve_cfg["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--mode", "job", "--stage", "deploy"],
            "stage: got 'deploy'; allowed stages: tokens, pretrain, finetune",
        ),
        (["--set", "k8s.storage.create_pvc=false"], "cluster.storage_path: got 'runs'"),
        (["--set", "cluster.storage_path=/data/runs"], "must be under k8s.storage.mount_path"),
        (["--set", "k8s.worker_groups.0=1"], "k8s.worker_groups"),
        (["--mode", "batch"], "batch"),
    ],
)
def test_render_bad_input_fails_naming_the_field(run_file: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["k8s", "render", str(run_file), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_object_store_storage_needs_no_pvc(helm: str, run_file: Path) -> None:
    text = render_cli(
        str(run_file),
        "--mode",
        "cluster",
        "--set",
        "cluster.storage_path=s3://bucket/runs",
        "--set",
        "k8s.storage.create_pvc=false",
    )
    docs = by_kind(text)
    assert "PersistentVolumeClaim" not in docs
    head = docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    assert "storage" not in {v["name"] for v in head["volumes"]}
    assert (
        yaml.safe_load(docs["ConfigMap"]["data"]["run.yaml"])["cluster"]["storage_path"] == "s3://bucket/runs"
    )


def test_release_names_are_dns1035_labels(run_file: Path) -> None:
    """KubeRay refuses Ray object names that do not start with a letter."""
    cfg = load_config(run_file, ["cluster.run_name=7B_Model.v2"])
    assert release_name(cfg, "service") == "raylm-7b-model-v2"
    assert release_name(cfg, "job", "finetune").startswith("raylm-7b-model-v2-finetune-")
    assert release_name(load_config(run_file, ["k8s.release_name=chat"]), "cluster") == "chat"
    long = load_config(run_file, ["k8s.release_name=a" + "b" * 39])
    assert len(release_name(long, "job", "finetune")) <= 47  # KubeRay's limit for RayJob names


def test_stage_entrypoint_contract() -> None:
    assert entrypoint("pretrain", "run.yaml") == "python -m cluster.run_stage pretrain --config run.yaml"
    for alias, stage in STAGE_ALIASES.items():  # the names the CLI always accepted run the same stage
        assert entrypoint(alias, "run.yaml") == entrypoint(stage, "run.yaml")
    with pytest.raises(ValueError, match="allowed stages: tokens, pretrain, finetune, eval, export"):
        entrypoint("deploy", "run.yaml")
    assert importlib.util.find_spec(RUNNER_MODULE), "a RayJob would run a module that does not exist"
