"""What `raylm submit` ships: a small working_dir package with the resolved config, no runs/venv/.git."""

from __future__ import annotations

import zipfile
from pathlib import Path

import yaml

from cluster.config import load_config
from cluster.submit import (
    CONFIG_IN_PACKAGE,
    REPO_ROOT,
    build_package,
    build_runtime_env,
    config_for_cluster,
    config_hash,
    git_commit,
    submission_base_id,
)

FORBIDDEN_TOP = {".git", ".venv", "venv", "runs", ".tools", "bench-results", "checkpoints"}


def _top_dirs(names: list[str]) -> set[str]:
    return {n.split("/", 1)[0] for n in names if "/" in n}


def test_repository_package_is_small_and_clean(tmp_path: Path) -> None:
    cfg = config_for_cluster(load_config(None, ["train.max_steps=7", "cluster.run_name=pkgtest"]))
    package = build_package(cfg, tmp_path)
    names = package.names()
    # Exactly the zip Ray uploads: its size on disk is the upload size.
    assert package.size_bytes == package.path.stat().st_size
    assert package.size_bytes < 3 * 1024 * 1024, f"package is {package.size_bytes} bytes"
    assert not (_top_dirs(names) & FORBIDDEN_TOP), sorted(_top_dirs(names) & FORBIDDEN_TOP)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or ".egg-info" in n]
    assert {"cluster/submit.py", "cluster/run_stage.py", "pyproject.toml", CONFIG_IN_PACKAGE} <= set(names)
    # These folders exist in the checkout, so the assertions above are not vacuous.
    assert (REPO_ROOT / ".git").exists() and (REPO_ROOT / ".venv").is_dir()  # .git is a file in a worktree


def test_package_ships_the_resolved_config(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["train.max_steps=7", "cluster.run_name=pkgtest", "cluster.address=10.0.0.1:6379"]
    )
    shipped = config_for_cluster(cfg, cwd=tmp_path)
    with zipfile.ZipFile(build_package(shipped, tmp_path).path) as zf:
        tree = yaml.safe_load(zf.read(CONFIG_IN_PACKAGE))
    assert tree["train"]["max_steps"] == 7
    assert tree["cluster"]["run_name"] == "pkgtest"
    # The job joins the cluster it runs on, and a relative storage path is pinned to the submitter's dir.
    assert tree["cluster"]["address"] is None
    assert tree["cluster"]["storage_path"] == str(tmp_path / "runs")
    assert load_config(None, []).cluster.storage_path == "runs"


def test_excludes_apply_to_any_root_including_a_local_storage_path(
    tiny_project: Path, tmp_path: Path
) -> None:
    (tiny_project / "outputs" / "myrun").mkdir(parents=True)
    (tiny_project / "outputs" / "myrun" / "weights.bin").write_bytes(b"\0" * 4096)
    (tiny_project / "notes.txt").write_text("kept")
    cfg = load_config(None, [f"cluster.storage_path={tiny_project / 'outputs'}"])
    out = tmp_path / "pkg"
    out.mkdir()
    names = set(build_package(cfg, out, root=tiny_project).names())
    assert {"hello.py", "pkg/__init__.py", "notes.txt", CONFIG_IN_PACKAGE} <= names
    assert not [
        n for n in names if n.split("/", 1)[0] in FORBIDDEN_TOP | {"outputs", "x.egg-info", "__pycache__"}
    ]


def test_code_hash_is_stable_and_tracks_content(tiny_project: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [])
    hashes = []
    for i in range(3):
        out = tmp_path / f"p{i}"
        out.mkdir()
        if i == 2:
            (tiny_project / "hello.py").write_text("print('changed')\n")
        hashes.append(build_package(cfg, out, root=tiny_project).code_hash)
    assert hashes[0] == hashes[1] != hashes[2]


def test_runtime_env_carries_pip_env_vars_and_package() -> None:
    cfg = load_config(None, ["cluster.pip=[einops==0.8.1]", "cluster.env_vars={HF_HUB_OFFLINE: '1'}"])
    env = build_runtime_env(cfg, "/tmp/pkg.zip")
    assert env["working_dir"] == "/tmp/pkg.zip"
    assert env["pip"] == ["einops==0.8.1"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert env["env_vars"]["RAYLM_CONFIG"] == CONFIG_IN_PACKAGE
    assert "pip" not in build_runtime_env(load_config(None, []), "/tmp/pkg.zip")


def test_submission_id_is_deterministic_per_stage_config_and_code() -> None:
    a, b = load_config(None, []), load_config(None, ["train.lr=3e-4"])
    ep = "python -m cluster.run_stage pretrain --config raylm_run.yaml"
    first = submission_base_id("train", ep, config_hash(a), "code1", "demo")
    assert first == submission_base_id("train", ep, config_hash(a), "code1", "demo")
    assert first.startswith("raylm-train-demo-")
    assert first != submission_base_id("train", ep, config_hash(b), "code1", "demo")
    assert first != submission_base_id("train", ep, config_hash(a), "code2", "demo")


def test_git_commit_names_head() -> None:
    commit = git_commit()
    assert len(commit.removesuffix("-dirty")) == 40 and int(commit[:40], 16) >= 0


def test_cli_rejects_unknown_stage_before_any_work(cli, tmp_path: Path) -> None:
    res = cli("submit", "deploy", str(tmp_path / "missing.yaml"), "--address", "http://127.0.0.1:9")
    assert res.returncode == 2
    assert "unknown stage 'deploy'" in res.stderr and "pretrain" in res.stderr and "finetune" in res.stderr
