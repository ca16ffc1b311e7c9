"""Fail fast and say why: runs the cluster can never hold, and broken model folders.

Every command runs as a user runs it, in a real subprocess. Commands that start an embedded Ray get
their own RAY_TMPDIR, so the test can tell that none of that Ray's processes outlived the command
(other clusters on the host are never looked at, let alone stopped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from cluster.config import load_config
from cluster.model_folder import ModelFolderError, check_model_folder
from cluster.preflight import (
    PreflightError,
    autoscaler_node_types,
    check_capacity,
    estimate_memory,
    has_autoscaler,
    node_types_in_status,
    place,
    preflight,
    provisions_nodes,
    read_estimate,
    stage_demand,
)
from tests.serve.conftest import free_port

RAYLM = str(Path(sys.executable).with_name("raylm"))
REPO = Path(__file__).resolve().parents[2]
TINY_TRAIN = REPO / "configs" / "tiny-cpu.yaml"


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short RAY_TMPDIR of the test's own (Unix socket paths must stay under ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="rlp", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def raylm(*args: str, ray_tmp: Path | None = None, join: bool = False, timeout: float = 300):
    """`raylm ARGS` in a subprocess: joining the session cluster (`join`), else an embedded Ray."""
    env = dict(os.environ)
    if not join:
        env.pop("RAY_ADDRESS", None)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return subprocess.run(
        [RAYLM, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False, cwd=REPO
    )


def leftover_ray_processes(ray_tmp: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(ray_tmp) in cmdline:
                found.append(cmdline[:120])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def assert_one_line_failure(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    out = res.stdout + res.stderr
    assert res.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---- capacity -------------------------------------------------------------------------------------
def test_placement_follows_ray_strategies() -> None:
    cfg = load_config(None, ["train.num_workers=4", "train.cpus_per_worker=1"])
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert place(stage_demand(cfg, "pretrain"), nodes) is None  # 4 workers + 1 CPU for Ray Data > 4 CPUs
    two = load_config(None, ["train.num_workers=2", "train.cpus_per_worker=1"])
    assert place(stage_demand(two, "pretrain"), nodes) == [0, 0, 1]
    strict = load_config(None, ["train.num_workers=2", "train.cpus_per_worker=1.5"])
    assert place(stage_demand(strict, "pretrain"), nodes) is None  # 1.5 + 1.5 + 1 cannot share 2 + 2
    spread = load_config(None, ["train.num_workers=3", "train.placement_strategy=STRICT_SPREAD"])
    assert place(stage_demand(spread, "pretrain"), [{"CPU": 8.0}] * 2) is None  # 3 distinct nodes needed
    pack = load_config(None, ["train.num_workers=3", "train.placement_strategy=STRICT_PACK"])
    assert place(stage_demand(pack, "pretrain"), [{"CPU": 1.0}, {"CPU": 8.0}]) == [1, 1, 1, 0]
    gpu = load_config(None, ["train.use_gpu=true", "train.num_workers=2"])
    assert place(stage_demand(gpu, "pretrain"), [{"CPU": 64.0}]) is None  # no GPU anywhere


def test_impossible_train_request_fails_at_once_on_embedded_ray(ray_tmp: Path) -> None:
    res = raylm(
        "train", str(TINY_TRAIN),
        "--set", "train.num_workers=16", "--set", "train.cpus_per_worker=1",
        "--set", "cluster.local_num_cpus=2",
        ray_tmp=ray_tmp,
    )  # fmt: skip
    assert_one_line_failure(
        res, 2, "asked pretrain: 16 x {CPU: 1}", "the cluster has 1 node(s) (2 CPU",
        "Change train.num_workers", "cluster.autoscaler: true",
    )  # fmt: skip
    assert not leftover_ray_processes(ray_tmp)


# ---- autoscaler: detected, or set ---------------------------------------------------------------
def test_local_cluster_reports_no_autoscaler_and_the_setting_overrides(ray_cluster) -> None:
    """The session cluster's head runs Ray's monitor in read-only mode: it reports each node as
    `node_<id>` and can add none, so `auto` means fail fast; true/false override the detection."""
    deadline = time.monotonic() + 60
    while not (types := autoscaler_node_types()) and time.monotonic() < deadline:
        time.sleep(1)  # the monitor writes its first report a few seconds after the head starts
    import ray

    alive = {f"node_{n['NodeID']}" for n in ray.nodes() if n["Alive"]}
    assert types and types <= alive | {f"node_{n['NodeID']}" for n in ray.nodes()}, (types, alive)
    assert not provisions_nodes(types)
    assert os.environ.get("RAY_ADDRESS")  # joined, so `auto` asks the cluster
    assert has_autoscaler(load_config(None)) is False
    assert has_autoscaler(load_config(None, ["cluster.autoscaler=true"])) is True
    assert has_autoscaler(load_config(None, ["cluster.autoscaler=false"])) is False


def test_fake_kuberay_autoscaler_status_is_detected() -> None:
    """An autoscaler v1 status shaped like KubeRay's in-tree autoscaler writes it (node types are the
    RayCluster's head and worker groups); a real one cannot run here, hence the fake."""
    kuberay = {
        "autoscaler_report": {
            "active_nodes": {"headgroup": 1, "cpu-workers": 1},
            "idle_nodes": {},
            "pending_nodes": [["10.0.0.7", "cpu-workers", "STARTING"]],
            "pending_launches": {"cpu-workers": 2},
            "failed_nodes": [],
            "node_type_mapping": {"10.0.0.5": "headgroup"},
        }
    }
    assert node_types_in_status(kuberay) == {"headgroup", "cpu-workers"}
    assert provisions_nodes(node_types_in_status(kuberay))
    readonly = {"autoscaler_report": {"active_nodes": {"node_" + "ab" * 28: 1}, "pending_nodes": []}}
    assert not provisions_nodes(node_types_in_status(readonly))
    assert not provisions_nodes(node_types_in_status({"load_metrics_report": {}}))  # no report yet


def test_autoscaler_setting_error_names_field_and_values() -> None:
    from cluster.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, ["cluster.autoscaler=sometimes"])
    assert "cluster.autoscaler" in str(err.value) and "'auto', True or False" in str(err.value)


def test_autoscaler_wait_names_what_it_waits_for_and_ends(ray_cluster) -> None:
    out = StringIO()
    console = Console(file=out, force_terminal=True, width=400)
    cfg = load_config(
        None,
        ["cluster.autoscaler=true", "cluster.resource_wait_timeout_s=3", "train.num_workers=64",
         "train.cpus_per_worker=1"],
    )  # fmt: skip
    with pytest.raises(PreflightError) as err:
        check_capacity(cfg, "train", console)
    assert re.search(r"after waiting \d+ s \(cluster.resource_wait_timeout_s\)", str(err.value)), err.value
    shown = out.getvalue()
    assert "waiting for the autoscaler to add nodes for pretrain: 64 x {CPU: 1}" in shown, shown[-2000:]
    assert "cluster.resource_wait_timeout_s" in shown


def test_autoscaler_wait_ends_at_resource_wait_timeout(ray_tmp: Path) -> None:
    """The real command on an embedded Ray told it has an autoscaler: waits, then one line, exit 2."""
    started = time.monotonic()
    big = raylm(
        "train", str(TINY_TRAIN),
        "--set", "cluster.autoscaler=true", "--set", "cluster.resource_wait_timeout_s=3",
        "--set", "train.num_workers=64", "--set", "train.cpus_per_worker=1",
        "--set", "cluster.local_num_cpus=2",
        ray_tmp=ray_tmp, timeout=240,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert_one_line_failure(big, 2, "after waiting", "cluster.resource_wait_timeout_s", "64 x {CPU: 1}")
    assert elapsed >= 3  # it waited for the autoscaler; the subprocess timeout bounds it above
    assert not leftover_ray_processes(ray_tmp)


def test_joined_cluster_without_autoscaler_fails_at_once_on_auto(ray_cluster) -> None:
    res = raylm(
        "train", str(TINY_TRAIN),
        "--set", "train.num_workers=64", "--set", "train.cpus_per_worker=1",
        "--set", "cluster.autoscaler=auto",
        join=True,
    )  # fmt: skip
    line = assert_one_line_failure(res, 2, "asked pretrain: 64 x {CPU: 1}", "cluster.autoscaler: true")
    assert "after waiting" not in line


# ---- memory -----------------------------------------------------------------------------------------
def test_memory_estimate_follows_zero_stage_offload_and_micro_batch() -> None:
    nodes = [{"CPU": 8.0, "memory": 64 * 2**30}]
    base = ["model.hidden_size=512", "model.num_layers=8", "model.intermediate_size=1376"]
    base.append("train.num_workers=4")
    z0 = estimate_memory(load_config(None, [*base, "train.zero_stage=0"]), 4, nodes)
    z3 = estimate_memory(load_config(None, [*base, "train.zero_stage=3"]), 4, nodes)
    assert z3.states_per_worker < z0.states_per_worker  # ZeRO-3 partitions the states over 4 workers
    partitioned = [*base, "train.zero_stage=3", "train.zero3_param_persistence_threshold=0"]
    split = estimate_memory(load_config(None, partitioned), 4, nodes)
    assert z3.states_per_worker - split.states_per_worker == 4 * z3.trainable  # CPU keeps them whole
    off = estimate_memory(
        load_config(None, [*base, "train.offload_optimizer=true", "train.offload_params=true"]), 4, nodes
    )
    assert off.states_per_worker < z3.states_per_worker and off.host_states_per_node > z3.host_states_per_node
    big_batch = estimate_memory(load_config(None, [*base, "train.micro_batch_size=32"]), 4, nodes)
    assert big_batch.activations_per_worker > 3 * z3.activations_per_worker


def test_finetune_estimate_counts_lora_adapters_as_the_only_trainable_weights() -> None:
    nodes = [{"CPU": 8.0, "memory": 64 * 2**30}]
    base = ["model.hidden_size=512", "model.num_layers=8", "model.intermediate_size=1376"]
    base.append("train.zero_stage=2")
    full = estimate_memory(load_config(None, base), 2, nodes, "finetune")
    lora_cfg = load_config(None, [*base, "finetune.method=lora", "finetune.lora_r=8"])
    lora = estimate_memory(lora_cfg, 2, nodes, "finetune")
    assert full.trainable == full.params and full.stage == "finetune"
    # r·(in + out) for q, k, v, o of 8 layers at hidden 512 (4 heads of 128 -> k/v as wide as q)
    assert lora.trainable == 8 * 4 * 8 * (512 + 512), lora.trainable
    assert lora.params == full.params + lora.trainable
    assert lora.states_per_worker < full.states_per_worker  # no optimizer state for the frozen base
    longer = estimate_memory(load_config(None, [*base, "finetune.max_seq_len=1024"]), 2, nodes, "finetune")
    assert longer.activations_per_worker > full.activations_per_worker


def test_training_estimate_is_written_to_the_run_folder(ray_cluster, tmp_path: Path) -> None:
    cfg = load_config(
        TINY_TRAIN, [f"cluster.storage_path={tmp_path}", "finetune.method=lora", "finetune.num_workers=1"]
    )
    out = StringIO()
    est = preflight(cfg, "finetune", Console(file=out))
    assert est is not None and "memory estimate (finetune)" in out.getvalue()
    written = tmp_path / "tiny-cpu" / "preflight" / "memory_finetune.json"
    assert json.loads(written.read_text())["per_node"] == est.per_node
    assert read_estimate(cfg, "finetune") == est
    assert "\n" not in est.short() and "/node of" in est.short() and "trainable" in est.short()


def test_training_that_exceeds_node_memory_is_refused(ray_cluster) -> None:
    res = raylm("train", str(TINY_TRAIN), "--set", "cluster.node_memory_gb=0.01", join=True)
    assert_one_line_failure(res, 2, "per node", "cluster.node_memory_gb", "train.micro_batch_size")
    assert "memory estimate" in res.stderr and "activations" in res.stderr


def test_finetune_that_exceeds_node_memory_is_refused(ray_cluster, tmp_path: Path) -> None:
    res = raylm(
        "finetune", str(TINY_TRAIN), "--set", "cluster.node_memory_gb=0.01", "--set", "finetune.method=lora",
        "--set", f"cluster.storage_path={tmp_path}",
        join=True,
    )  # fmt: skip
    assert_one_line_failure(res, 2, "per node", "cluster.node_memory_gb", "finetune.micro_batch_size")
    assert "memory estimate (finetune)" in res.stderr and "trainable" in res.stderr
    assert not (tmp_path / "tiny-cpu" / "finetune").exists()  # refused before any work


# ---- model folders ----------------------------------------------------------------------------------
@pytest.fixture
def broken_model(rel_model: Path, tmp_path: Path) -> Path:
    """A copy of the tiny served model with model.safetensors cut to half its size."""
    folder = tmp_path / "broken"
    shutil.copytree(rel_model, folder)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return folder


def test_folder_check_names_file_and_problem(rel_model: Path, tmp_path: Path) -> None:
    assert check_model_folder(rel_model)["tensors"] > 0
    cases = {
        "config.json": lambda d: (d / "config.json").write_text("{not json"),
        "tokenizer_config.json": lambda d: (d / "tokenizer_config.json").unlink(),
        "no tokenizer vocabulary": lambda d: (d / "tokenizer.json").unlink(),
        "model-2.safetensors: missing (named by model.safetensors.index.json)": lambda d: (
            d / "model.safetensors.index.json"
        ).write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}})),
        "pickle weights are never loaded": lambda d: (
            (d / "model.safetensors").rename(d / "pytorch_model.bin")
        ),
        "header length": lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64),
    }
    for i, (needle, breakit) in enumerate(cases.items()):
        folder = tmp_path / f"case{i}"
        shutil.copytree(rel_model, folder)
        breakit(folder)
        with pytest.raises(ModelFolderError) as err:
            check_model_folder(folder)
        assert needle in str(err.value), (needle, str(err.value))


def test_broken_folder_fails_in_one_line_before_ray_for_serve_eval_and_k8s(
    broken_model: Path, tmp_path: Path, ray_tmp: Path
) -> None:
    problem = "model.safetensors: "
    served = raylm("serve", str(broken_model), ray_tmp=ray_tmp, timeout=120)
    assert_one_line_failure(served, 2, problem, "(truncated)")
    assert not leftover_ray_processes(ray_tmp) and not list(ray_tmp.iterdir())  # Ray never started

    run_dir = tmp_path / "runs" / "r"
    (run_dir / "export").mkdir(parents=True)
    shutil.copytree(broken_model, run_dir / "export" / "pretrained")
    sets = ["--set", f"cluster.storage_path={tmp_path / 'runs'}", "--set", "cluster.run_name=r"]
    evaluated = raylm("eval", str(TINY_TRAIN), *sets, ray_tmp=ray_tmp, timeout=120)
    assert_one_line_failure(evaluated, 2, problem, "(truncated)")
    assert not list(ray_tmp.iterdir())

    rendered = raylm(
        "k8s", "render", str(TINY_TRAIN), "--mode", "service", "--set", f"serve.model_path={broken_model}"
    )
    assert_one_line_failure(rendered, 2, problem, "(truncated)")


def test_replica_that_fails_at_runtime_ends_serve_with_its_error(
    rel_model: Path, tmp_path: Path, ray_tmp: Path
) -> None:
    """A folder that passes the check but cannot load (weights of another shape): bounded, one line."""
    folder = tmp_path / "mismatched"
    shutil.copytree(rel_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    res = raylm(
        "serve", str(folder), "--set", "serve.require_api_key=false", "--set", f"serve.port={free_port()}",
        ray_tmp=ray_tmp, timeout=400,
    )  # fmt: skip
    line = assert_one_line_failure(res, 1, "the model replicas failed to start")
    assert "size mismatch" in line or "Error" in line, line
    assert not leftover_ray_processes(ray_tmp)


def test_submit_refuses_a_job_the_cluster_cannot_hold_before_uploading(ray_cluster) -> None:
    from cluster.jobs_client import JobsClient

    before = {j.submission_id for j in JobsClient(ray_cluster.dashboard_url).list()}
    res = raylm(
        "submit", "train", str(TINY_TRAIN), "--address", ray_cluster.dashboard_url,
        "--set", "train.num_workers=64", "--set", "train.cpus_per_worker=1",
        "--set", "cluster.autoscaler=false",  # a submitted job decides `auto` on the cluster itself
        join=True,
    )  # fmt: skip
    assert_one_line_failure(res, 2, "asked pretrain: 64 x {CPU: 1}", "the cluster has 1 node(s) (8 CPU")
    assert {j.submission_id for j in JobsClient(ray_cluster.dashboard_url).list()} == before


def test_submit_refuses_on_the_default_autoscaler_setting(ray_cluster) -> None:
    """`auto` must refuse before uploading too: the Jobs API shows no autoscaler, so only
    `cluster.autoscaler: true` skips this check (the job's own preflight would fail only after upload)."""
    from cluster.jobs_client import JobsClient

    client = JobsClient(ray_cluster.dashboard_url)
    before = {j.submission_id for j in client.list()}
    try:
        res = raylm(
            "submit", "train", str(TINY_TRAIN), "--address", ray_cluster.dashboard_url, "--no-wait",
            "--set", "train.num_workers=64", "--set", "train.cpus_per_worker=1",
            join=True,
        )  # fmt: skip
    finally:  # a job that got through would wait forever on the shared cluster: stop it
        for job in client.list():
            if job.submission_id not in before:
                client.stop(job.submission_id)
    assert_one_line_failure(res, 2, "asked pretrain: 64 x {CPU: 1}")
