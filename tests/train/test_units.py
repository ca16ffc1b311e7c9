"""Fast checks without Ray: DeepSpeed config arithmetic, LR schedule, checkpoint completeness, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import load_config
from jobs.checkpointing import COMPLETE_MARKER, incompleteness, newest_complete, write_meta
from jobs.config import TrainConfig
from jobs.deepspeed_config import deepspeed_config, lr_lambda
from jobs.export import ExportError, resolve_checkpoint
from jobs.metrics import mfu
from jobs.model import FlopsSpec

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_deepspeed_config_cpu_defaults():
    ds = deepspeed_config(TrainConfig(micro_batch_size=4, grad_accum_steps=3, grad_clip=0.5), world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert "bf16" not in ds and "fp16" not in ds  # auto = fp32 on CPU


def test_deepspeed_config_gpu_bf16_and_offload():
    cfg = TrainConfig(use_gpu=True, offload_optimizer=True, offload_params=True)
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]


def test_deepspeed_config_rejects_param_offload_below_stage3():
    with pytest.raises(ValueError, match="offload_params needs train.zero_stage 3"):
        deepspeed_config(TrainConfig(zero_stage=2, offload_params=True), world_size=1)


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lr_lambda(TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_palm_flops_per_token_and_mfu():
    spec = FlopsSpec(num_params=1000, num_layers=2, num_heads=4, head_dim=16, seq_len=64)
    assert spec.flops_per_token() == 6 * 1000 + 12 * 2 * 4 * 16 * 64
    assert mfu(tokens_per_s=100.0, flops_per_token=1e6, peak_flops_total=1e9) == pytest.approx(0.1)


def _fake_checkpoint(root: Path, name: str, step: int) -> Path:
    d = root / name
    (d / f"global_step{step}").mkdir(parents=True)
    for rank in (0, 1):
        (d / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    files = {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}
    write_meta(d, {"step": step, "tag": f"global_step{step}", "world_size": 2, "zero_stage": 3}, files)
    return d


def test_partial_and_corrupted_checkpoints_are_detected_and_skipped(tmp_path, caplog):
    good = _fake_checkpoint(tmp_path, "checkpoint_a", 2)
    missing = _fake_checkpoint(tmp_path, "checkpoint_b", 4)
    (missing / "global_step4" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    truncated = _fake_checkpoint(tmp_path, "checkpoint_c", 6)
    (truncated / "global_step6" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    unmarked = _fake_checkpoint(tmp_path, "checkpoint_d", 8)
    (unmarked / COMPLETE_MARKER).unlink()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own file: not a checkpoint
    assert incompleteness(good) is None
    assert "missing shard file global_step4/zero_pp_rank_1" in incompleteness(missing)
    assert "has 1 bytes, expected 10" in incompleteness(truncated)
    assert "no COMPLETE marker" in incompleteness(unmarked)
    with caplog.at_level("WARNING"):
        assert newest_complete(tmp_path) == good
    skipped = [r.getMessage() for r in caplog.records if "skipping incomplete checkpoint" in r.getMessage()]
    assert len(skipped) == 3 and "checkpoint_d" in skipped[0]
    assert resolve_checkpoint(tmp_path) == good
    with pytest.raises(ExportError, match="not a complete checkpoint: no COMPLETE marker"):
        resolve_checkpoint(unmarked)
    (good / "raylm_meta.json").write_text(json.dumps({"broken": True})[:5])
    assert "unreadable raylm_meta.json" in incompleteness(good)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_validates(path):
    cfg = load_config(path)
    assert cfg.train.max_steps >= 1


def test_gpu_configs_are_zero3_bf16_and_sized():
    one = load_config(CONFIGS[0].with_name("gpu-125m-1node.yaml"))
    two = load_config(CONFIGS[0].with_name("gpu-1b-2node.yaml"))
    for cfg, workers in ((one, 8), (two, 16)):
        t = cfg.train
        assert (t.num_workers, t.use_gpu, t.zero_stage, t.precision) == (workers, True, 3, "bf16")
