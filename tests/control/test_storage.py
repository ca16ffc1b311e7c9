"""Finding a run and its newest complete checkpoint by name, on a local path or a pyarrow URI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.storage import RunNotFound, find_run, list_runs, resolve_checkpoint


def _checkpoint(stage_dir: Path, name: str, step: int, complete: bool = True) -> Path:
    d = stage_dir / name
    d.mkdir(parents=True)
    (d / "raylm_meta.json").write_text(json.dumps({"step": step, "files": {}}))
    if complete:
        (d / "COMPLETE").write_text("ok\n")
    return d


@pytest.mark.parametrize("as_uri", [False, True])
def test_find_run_and_newest_complete_checkpoint(tmp_path: Path, as_uri: bool) -> None:
    stage = tmp_path / "storage" / "myrun" / "pretrain"
    _checkpoint(stage, "checkpoint_2026-01-01_00-00-01", 3)
    newest = _checkpoint(stage, "checkpoint_2026-01-01_00-00-02", 6)
    _checkpoint(stage, "checkpoint_2026-01-01_00-00-03", 9, complete=False)  # a crash mid-save
    (tmp_path / "storage" / "other").mkdir()
    storage = f"file://{tmp_path / 'storage'}" if as_uri else str(tmp_path / "storage")

    assert list_runs(storage) == ["myrun", "other"]
    run = find_run(storage, "myrun")
    assert [c.step for c in run.checkpoints()] == [6, 3]
    expected = f"file://{newest}" if as_uri else str(newest)
    assert run.latest_checkpoint().uri == expected
    assert resolve_checkpoint("myrun", storage) == expected
    assert resolve_checkpoint(str(newest), "unused") == str(newest)

    with pytest.raises(RunNotFound, match=r"no run 'nope' .*runs there: myrun, other"):
        find_run(storage, "nope")
    with pytest.raises(RunNotFound, match="no complete checkpoint"):
        find_run(storage, "other").latest_checkpoint()


def test_missing_storage_lists_no_runs(tmp_path: Path) -> None:
    assert list_runs(str(tmp_path / "absent")) == []
