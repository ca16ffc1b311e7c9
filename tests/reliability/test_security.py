"""Security defaults (see SECURITY.md): Ray token auth, API keys on by default, safetensors only, no
unsafe deserialisation, non-root chart pods."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.auth import find_token
from tests.reliability.conftest import REPO

PROJECT_DIRS = ("cluster", "data_pipelines", "jobs", "serve", "benchmarks")
NO_TOKEN = {
    "HOME": "",
    "RAY_AUTH_TOKEN": None,
    "RAY_AUTH_TOKEN_PATH": None,
    "RAY_AUTH_MODE": None,
    "RAY_ADDRESS": None,
}
JOIN = "import ray; ray.init(address={address!r}); print('JOINED', flush=True)"


def _env(tmp_path: Path, **changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        env.pop(key, None)
        if value is not None:
            env[key] = value or str(tmp_path)
    return env


def _join_without_token(address: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", JOIN.format(address=address)]
    return subprocess.run(cmd, env=_env(tmp_path, **NO_TOKEN), capture_output=True, text=True, timeout=180)


def test_local_cluster_refuses_clients_without_the_token(ray_cluster, tmp_path):
    refused = _join_without_token(ray_cluster.address, tmp_path)
    assert refused.returncode != 0 and "JOINED" not in refused.stdout, refused.stdout + refused.stderr[-2000:]
    jobs = f"{ray_cluster.dashboard_url}/api/jobs/"
    assert httpx.get(jobs, timeout=30).status_code in (401, 403)
    assert httpx.get(jobs, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code in (401, 403)
    token = find_token()
    assert token is not None
    assert httpx.get(jobs, headers=token.headers(), timeout=30).status_code == 200  # the check can pass


EMBEDDED = textwrap.dedent(
    """
    import subprocess, sys, ray
    from cluster.config import ClusterConfig
    from cluster.local_ray import ensure_ray
    ensure_ray(ClusterConfig(local_num_cpus=1))
    address = ray.get_runtime_context().gcs_address
    child = subprocess.run([sys.executable, "-c", sys.argv[1].format(address=address)], env=eval(sys.argv[2]),
                           capture_output=True, text=True, timeout=180)
    print("CHILD", child.returncode, "JOINED" in child.stdout, flush=True)
    ray.shutdown()
    """
)


def test_embedded_ray_of_ensure_ray_refuses_clients_without_the_token(tmp_path):
    """`raylm train/serve` without a cluster start Ray in-process; that Ray must require the token too."""
    user_env = _env(tmp_path, RAY_ADDRESS=None, RAY_AUTH_MODE=None)  # a user's shell sets neither
    child_env = _env(tmp_path, **NO_TOKEN)
    cmd = [sys.executable, "-c", EMBEDDED, JOIN, repr(child_env)]
    done = subprocess.run(cmd, env=user_env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert "CHILD" in done.stdout, done.stderr[-3000:]
    rc, joined = done.stdout.split("CHILD", 1)[1].split()[:2]
    assert rc != "0" and joined == "False", done.stdout


def test_api_keys_are_required_unless_explicitly_disabled(rel_model, monkeypatch):
    from serve.app import build_app
    from serve.config import ServeConfig

    defaults = ServeConfig()
    assert defaults.require_api_key is True and defaults.host == "127.0.0.1"
    monkeypatch.delenv("RAYLM_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="require_api_key"):
        build_app({"model_path": str(rel_model), "serve": {}})
    build_app({"model_path": str(rel_model), "serve": {"require_api_key": False}})  # an explicit opt-out


def test_missing_api_key_file_is_an_error(rel_model, monkeypatch, tmp_path):
    from serve.app import build_app

    monkeypatch.setenv("RAYLM_API_KEYS", "sk-env-key")
    with pytest.raises((ValueError, FileNotFoundError), match="keys.txt"):
        build_app({"model_path": str(rel_model), "serve": {"api_key_file": str(tmp_path / "keys.txt")}})


def _project_files() -> list[Path]:
    return sorted(p for d in PROJECT_DIRS for p in (REPO / d).rglob("*.py"))


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        weights_only = kwargs.get("weights_only")
        if name == "torch.load" and not (
            isinstance(weights_only, ast.Constant) and weights_only.value is True
        ):
            found.append(f"{name} without weights_only=True (line {node.lineno})")
        if name in (
            "pickle.load",
            "pickle.loads",
            "cloudpickle.load",
            "cloudpickle.loads",
            "yaml.unsafe_load",
            "dill.load",
            "joblib.load",
            "torch.jit.load",
        ):
            found.append(f"{name} (line {node.lineno})")
        if name == "yaml.load" and "SafeLoader" not in ast.unparse(node):
            found.append(f"yaml.load without SafeLoader (line {node.lineno})")
        allow_pickle = kwargs.get("allow_pickle")
        if (
            name in ("np.load", "numpy.load")
            and isinstance(allow_pickle, ast.Constant)
            and allow_pickle.value
        ):
            found.append(f"{name}(allow_pickle=True) (line {node.lineno})")
    return found


def test_no_unsafe_deserialisation_in_project_code():
    files = _project_files()
    assert len(files) > 20
    offenders = {
        str(f.relative_to(REPO)): bad for f in files if (bad := _unsafe_calls(ast.parse(f.read_text())))
    }
    assert offenders == {}
    # The checker itself catches what it is meant to catch.
    assert (
        len(_unsafe_calls(ast.parse("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)")))
        == 3
    )


def test_serve_loader_refuses_a_pickle_only_model_folder(rel_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from serve.model_server import LLMServer

    folder = tmp_path / "bin-only"
    shutil.copytree(rel_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(rel_model, local_files_only=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        LLMServer(str(folder), 4, 1)


def _pod_specs(doc) -> list[dict]:
    """Every dict that holds `containers` (a pod spec), wherever the CRD nests it."""
    found = []
    if isinstance(doc, dict):
        if isinstance(doc.get("containers"), list):
            found.append(doc)
        for value in doc.values():
            found += _pod_specs(value)
    elif isinstance(doc, list):
        for value in doc:
            found += _pod_specs(value)
    return found


def test_chart_pods_run_non_root_with_a_restricted_security_context():
    from cluster.config import ConfigError, load_config
    from cluster.k8s_render import MODES, render

    cfg = load_config(None, ["cluster.storage_path=s3://bucket/runs", "serve.api_key_file=/etc/raylm/keys"])
    pods = []
    for mode in MODES:
        docs = [d for d in yaml.safe_load_all(render(cfg, mode)) if d]
        pods += _pod_specs(docs)
        config_maps = [d for d in docs if d["kind"] == "ConfigMap"]
        assert all("sk-" not in yaml.safe_dump(c) for c in config_maps)
    assert len(pods) >= 4  # cluster head + workers, job, service
    for pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, psc
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], sc
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0, sc
    with pytest.raises(ConfigError, match="run_as_user"):
        load_config(None, ["k8s.security.run_as_user=0"])
