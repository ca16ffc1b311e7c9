"""Elastic resume: a ZeRO-3 checkpoint written by 2 workers resumes on 1 through DeepSpeed's universal
checkpoint, with the model, the optimizer state and the LR schedule carried over."""

from __future__ import annotations

import pytest
import torch

from jobs.checkpointing import read_meta
from jobs.metrics import read_metrics
from jobs.pretrain import train
from tests.train.conftest import SEQ_LEN, datasets, tiny_config
from tests.train.test_exact_resume import _losses_by_run, _unmark

SETS = {"train.zero_stage": 3, "train.max_steps": 12, "train.checkpoint_every": 6, "train.eval_every": 100,
        "train.num_to_keep": 3, "train.lr": 3e-3}


def test_zero3_checkpoint_of_two_workers_resumes_on_one(ray_cluster, blocks, char_tokenizer, tmp_path):
    train_ds, val_ds = datasets(blocks)
    two = tiny_config(tmp_path, "elastic", **SETS)
    train(two, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, export_model=False, progress=False)
    out_dir = tmp_path / "elastic" / "pretrain"
    _unmark(out_dir, {12})  # resume from step 6, where the optimizer state is 6 steps old
    one = tiny_config(tmp_path, "elastic", **SETS, **{"train.num_workers": 1})
    result = train(one, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, resume=True, export_model=False,
                   progress=False)

    records = read_metrics(out_dir)
    elastic = [r for r in records if r["event"] == "elastic_resume"]
    assert len(elastic) == 1 and elastic[0]["step"] == 6, elastic
    assert (elastic[0]["from_world_size"], elastic[0]["to_world_size"]) == (2, 1)
    first, resumed = _losses_by_run(out_dir)
    assert list(resumed) == list(range(7, 13))
    # The model carried over: the first resumed loss sits by the checkpoint's loss, far from the initial one.
    initial, at_checkpoint = first[1], first[6]
    assert initial - at_checkpoint > 0.5, first
    assert abs(resumed[7] - at_checkpoint) < 0.25 * (initial - at_checkpoint), (first, resumed)
    # The LR schedule carried over: step 7 reports the rate the 2-worker run reported there.
    lr7 = [r["lr"] for r in records if r["event"] == "train" and r["step"] == 7]
    assert len(lr7) == 2 and lr7[1] == pytest.approx(lr7[0], rel=1e-9) and lr7[0] < 3e-3
    # The optimizer state carried over: AdamW's step count in the 1-worker checkpoint is 6 restored + 6 new
    # (a fresh optimizer would count 6), and its moments are populated.
    meta = read_meta(result.checkpoint)
    assert (meta["step"], meta["world_size"]) == (12, 1)
    (optim_file,) = result.checkpoint.glob("global_step12/*optim_states.pt")
    saved = torch.load(optim_file, map_location="cpu", weights_only=False)  # written by this test's run
    adam = saved["optimizer_state_dict"]["optimizer_state_dict"]["state"]
    assert adam and {int(s["step"]) for s in adam.values()} == {12}
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in adam.values())
