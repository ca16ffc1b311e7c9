"""Pipeline bookkeeping: skip what is current, continue where a run stopped, re-run what a config change
affects, and never deploy past a failing evaluation gate.

The stages here are small functions that write their output file, so these tests exercise exactly the
orchestration (keys, records, resume, gate) in seconds; the real stages run in test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from cluster.config import load_config
from cluster.pipeline import GateError, Pipeline, Stage, check_gate, run_pipeline


class Recorder:
    """Stages a→b→c reading the data, finetune and eval sections; remembers every call."""

    def __init__(self, fail_in: str | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.fail_in = fail_in

    def stage(self, name: str, sections: tuple[str, ...], train_dir: str | None = None) -> Stage:
        def output(cfg) -> Path:
            return Path(cfg.run_dir()) / f"{name}.out"

        def run(cfg, resume: bool) -> dict:
            self.calls.append((name, resume))
            if train_dir:
                (Path(cfg.run_dir()) / train_dir / "checkpoint_000001").mkdir(parents=True, exist_ok=True)
            if name == self.fail_in:
                raise RuntimeError(f"{name} interrupted")
            output(cfg).write_text("ok")
            return {"call": len(self.calls)}

        return Stage(name, sections, output, run, train_dir=train_dir)

    def stages(self) -> list[Stage]:
        return [
            self.stage("a", ("data",)),
            self.stage("b", ("finetune",), "b_train"),
            self.stage("c", ("eval",)),
        ]


def config(tmp_path, *overrides: str):
    return load_config(None, [f"cluster.storage_path={tmp_path}", "cluster.run_name=logic", *overrides])


def run(cfg, recorder: Recorder) -> list[str]:
    return [o.status for o in Pipeline(cfg, recorder.stages(), Console(quiet=True)).run()]


def test_second_run_skips_completed_stages(tmp_path):
    rec = Recorder()
    assert run(config(tmp_path), rec) == ["ran", "ran", "ran"]
    assert run(config(tmp_path), rec) == ["skipped", "skipped", "skipped"]
    assert rec.calls == [("a", False), ("b", False), ("c", False)]
    record = json.loads((tmp_path / "logic" / "stages" / "b.json").read_text())
    assert record["status"] == "done" and record["detail"] == {"call": 2}


def test_changed_config_reruns_the_affected_stage_and_those_after_it(tmp_path):
    rec = Recorder()
    run(config(tmp_path), rec)
    rec.calls.clear()
    assert run(config(tmp_path, "finetune.lr=1e-4"), rec) == ["skipped", "ran", "ran"]
    assert [name for name, _ in rec.calls] == ["b", "c"]
    rec.calls.clear()
    assert run(config(tmp_path, "finetune.lr=1e-4", "eval.max_new_tokens=8"), rec) == [
        "skipped",
        "skipped",
        "ran",
    ]
    rec.calls.clear()
    # The gate threshold decides only whether to deploy: changing it re-runs nothing.
    gated = config(tmp_path, "finetune.lr=1e-4", "eval.max_new_tokens=8", "eval.min_exact_match=0.5")
    assert run(gated, rec) == ["skipped", "skipped", "skipped"]
    # A missing output re-runs its stage, and the stages after it (their input is new).
    (tmp_path / "logic" / "b.out").unlink()
    assert run(gated, rec) == ["skipped", "ran", "ran"]
    # Back to the first config: the stage reading the changed section runs again.
    rec.calls.clear()
    assert run(config(tmp_path), rec) == ["skipped", "ran", "ran"]


def test_interrupted_stage_resumes_from_its_checkpoints(tmp_path):
    failing = Recorder(fail_in="b")
    with pytest.raises(RuntimeError, match="b interrupted"):
        run(config(tmp_path), failing)
    rec = Recorder()
    assert run(config(tmp_path), rec) == ["skipped", "ran", "ran"]
    assert rec.calls == [("b", True), ("c", False)]


def test_checkpoints_of_another_configuration_are_not_resumed(tmp_path):
    with pytest.raises(RuntimeError):
        run(config(tmp_path), Recorder(fail_in="b"))
    stale = tmp_path / "logic" / "b_train" / "checkpoint_000001" / "marker"
    stale.write_text("old")
    rec = Recorder()
    assert run(config(tmp_path, "finetune.max_steps=7"), rec) == ["skipped", "ran", "ran"]
    assert rec.calls[0] == ("b", False)
    assert not stale.exists()


def write_eval(cfg, exact_match: float) -> None:
    run_dir = Path(cfg.run_dir())
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    results = {"models": {"finetuned": {"exact_match": exact_match, "token_f1": 0.5, "examples": 10}}}
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))


def test_gate_decision(tmp_path):
    cfg = config(tmp_path, "eval.min_exact_match=0.5")
    write_eval(cfg, 0.7)
    assert check_gate(cfg, "finetuned").startswith("passed")
    write_eval(cfg, 0.3)
    with pytest.raises(GateError, match=r"exact match 0.300 is below eval.min_exact_match 0.500"):
        check_gate(cfg, "finetuned")
    assert check_gate(config(tmp_path), "finetuned").startswith("no gate")


def test_gate_blocks_the_deploy(ray_cluster, tmp_path, tiny_llama_dir):
    import shutil

    cfg = config(tmp_path, "eval.min_exact_match=0.9")

    def fake_finetune(cfg, resume):
        shutil.copytree(tiny_llama_dir, Path(cfg.run_dir()) / "export" / "finetuned")

    def fake_eval(cfg, resume):
        write_eval(cfg, 0.25)

    stages = [
        Stage("finetune", ("finetune",), lambda c: Path(c.run_dir()) / "export" / "finetuned", fake_finetune),
        Stage("eval", ("eval",), lambda c: Path(c.run_dir()) / "eval" / "results.json", fake_eval),
    ]
    deployed = []
    with pytest.raises(GateError, match="not deploying"):
        run_pipeline(cfg, stages, deploy_model_fn=lambda *a: deployed.append(a), console=Console(quiet=True))
    assert deployed == []
    report = (tmp_path / "logic" / "report.md").read_text()
    assert "evaluation gate: the finetuned model's exact match 0.250 is below" in report
    assert "- not deployed" in report
