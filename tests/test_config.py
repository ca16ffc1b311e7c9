"""The run configuration fails early and clearly: the dotted path, the value given and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, RunConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None)
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert cfg.train.zero_stage == 3


@pytest.mark.parametrize(
    ("text", "path", "expect"),
    [
        ("train:\n  zero_stagee: 3\n", "train.zero_stagee", "unknown key (allowed keys:"),
        ("train:\n  lr: fast\n", "train.lr", 'got "fast"'),
        ("train:\n  zero_stage: 4\n", "train.zero_stage", "0, 1, 2 or 3"),
        ("data:\n  seq_len: 2\n", "data.seq_len", "greater than or equal to 8"),
        ("data:\n  format: csv\n", "data.format", "'auto', 'txt', 'jsonl' or 'parquet'"),
        ("serve:\n  port: 70000\n", "serve.port", "less than or equal to 65535"),
        ("tokenizer:\n  kind: wordpiece\n", "tokenizer.kind", "'bpe' or 'char'"),
        ("cluster:\n  run_name: 'bad name'\n", "cluster.run_name", "pattern"),
        ("nonsense: 1\n", "nonsense", "allowed keys: cluster, data, eval, finetune"),
    ],
)
def test_bad_values_name_path_value_and_allowed(tmp_path: Path, text: str, path: str, expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    msg = str(err.value)
    assert f"{path}:" in msg and expect in msg, msg


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.01\n"), ["train.lr=3e-4", "data.paths=[a.txt, b.txt]"])
    assert cfg.train.lr == 3e-4 and cfg.data.paths == ["a.txt", "b.txt"]
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_non_mapping_and_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_section_hash_tracks_only_named_sections() -> None:
    a, b = RunConfig(), load_config(None, ["serve.port=9000"])
    assert a.section_hash("data", "tokenizer") == b.section_hash("data", "tokenizer")
    assert a.section_hash("serve") != b.section_hash("serve")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    load_config(path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_validate_exit_code_2_without_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path, "train:\n  zero_stage: 7\n  bogus: 1\n")
    res = run_cli("config", "validate", str(bad))
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert "train.zero_stage" in out and "train.bogus" in out
    assert "Traceback" not in out


def test_cli_show_prints_resolved_config_with_overrides(tmp_path: Path) -> None:
    res = run_cli("config", "show", str(write(tmp_path, "{}\n")), "--set", "train.max_steps=7")
    assert res.returncode == 0, res.stderr
    assert "max_steps: 7" in res.stdout and "zero_stage: 3" in res.stdout
