"""Two Ray Train workers with DeepSpeed ZeRO-3 learn, validate, checkpoint and export."""

from __future__ import annotations

import pytest
import torch

from jobs.checkpointing import read_meta
from jobs.pretrain import train
from jobs.train_loop import PROBE_FILE
from tests.train.conftest import SEQ_LEN, datasets, tiny_config

ZERO3 = {"train.zero_stage": 3, "train.max_steps": 30, "train.eval_every": 15, "train.checkpoint_every": 15,
         "train.lr": 3e-3}


@pytest.fixture(scope="module")
def zero3_run(ray_cluster, blocks, char_tokenizer, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), "zero3", **ZERO3)
    train_ds, val_ds = datasets(blocks)
    return cfg, train(cfg, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, progress=False)


def test_zero3_two_workers_loss_falls_and_val_reported(zero3_run):
    _, result = zero3_run
    train_recs = [r for r in result.metrics if r["event"] == "train"]
    val_recs = [r for r in result.metrics if r["event"] == "val"]
    start = [r for r in result.metrics if r["event"] == "start"]
    assert start[0]["world_size"] == 2 and start[0]["step"] == 0
    assert start[0]["whole_params"] == start[0]["num_params"]  # CPU auto: a small model is kept whole
    assert train_recs[-1]["step"] == 30
    first, last = train_recs[0]["loss"], train_recs[-1]["loss"]
    assert last < first - 1.0, (first, last)
    assert [r["step"] for r in val_recs] == [15, 30]
    assert val_recs[-1]["val_loss"] < train_recs[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train_recs)
    assert result.loss_curve.is_file() and (result.checkpoint.parent / "tensorboard").is_dir()
    meta = read_meta(result.checkpoint)
    assert meta["step"] == 30 and meta["zero_stage"] == 3 and meta["world_size"] == 2
    assert meta["tokens_seen"] == 30 * 2 * 8 * SEQ_LEN


def test_export_round_trip_same_logits(zero3_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = zero3_run
    out = result.export_dir
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.vocab_size == len(tok) and model.generation_config.eos_token_id == tok.eos_token_id
    probe = load_file(str(result.checkpoint / PROBE_FILE))  # logits of the DeepSpeed engine at the last step
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)


def test_zero3_leaf_layers_keep_the_loss_curve(zero3_run, char_tokenizer, blocks, tmp_path):
    """On CPU ZeRO-3 hooks whole decoder layers (`zero3_leaf_modules` auto); per-module hooks (none)
    must train the same steps to the same losses: fewer hook calls, same gathers and arithmetic."""
    _, result = zero3_run
    start = next(r for r in result.metrics if r["event"] == "start")
    assert start["zero3_leaf_modules"] == ["LlamaDecoderLayer"]
    per_module = tiny_config(tmp_path, "zero3-per-module", **{
        **ZERO3, "train.zero3_leaf_modules": "none", "train.eval_every": 10**6,
        "train.checkpoint_every": 10**6})
    train_ds, val_ds = datasets(blocks)
    again = train(per_module, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, export_model=False,
                  progress=False)
    assert next(r for r in again.metrics if r["event"] == "start")["zero3_leaf_modules"] == []
    losses = lambda res: {r["step"]: r["loss"] for r in res.metrics if r["event"] == "train"}  # noqa: E731
    leaf, module = losses(result), losses(again)
    assert list(module) == list(range(1, 31)) and list(leaf) == list(module)
    for step, loss in leaf.items():
        assert abs(module[step] - loss) <= 1e-6 * abs(loss), (step, loss, module[step])


def test_one_worker_without_zero_learns_and_reports_grad_norm(ray_cluster, blocks, char_tokenizer, tmp_path):
    """ZeRO-0 on one worker skips DeepSpeed's gradient all-reduce and measures the grad norm itself
    (DeepSpeed's fp32 clipping path keeps none): both must leave training and its metrics intact."""
    cfg = tiny_config(tmp_path, "zero0", **{
        "train.zero_stage": 0, "train.num_workers": 1, "train.max_steps": 12, "train.eval_every": 100,
        "train.checkpoint_every": 100, "train.lr": 3e-3,
    })
    train_ds, _ = datasets(blocks)
    result = train(cfg, train_ds, None, str(char_tokenizer), SEQ_LEN, progress=False, export_model=False)
    recs = [r for r in result.metrics if r["event"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(0 < r["grad_norm"] < 1e4 for r in recs), [r["grad_norm"] for r in recs]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5, (recs[0]["loss"], recs[-1]["loss"])
