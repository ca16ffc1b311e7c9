"""Bad configuration: every section rejects an unknown key, a wrong type and an out-of-range value with
exit code 2, naming the dotted path and what is allowed, before any work and without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import RunConfig

# section -> (field with a wrong type, value), (field out of range, value)
BAD_VALUES = {
    "data": (("seq_len", "long"), ("val_fraction", 1.5)),
    "tokenizer": (("vocab_size", "big"), ("vocab_size", 10)),
    "model": (("hidden_size", "wide"), ("hidden_size", 2)),
    "train": (("lr", "fast"), ("lr", 5.0)),
    "finetune": (("lora_r", [1]), ("lora_dropout", 1.5)),
    "eval": (("max_examples", "all"), ("max_examples", 0)),
    "serve": (("port", "http"), ("port", 70000)),
    "cluster": (("local_num_cpus", "many"), ("local_num_cpus", 0)),
    "k8s": (("namespace", 7), ("namespace", "Not_A_DNS_Label")),
}


def test_every_section_is_covered():
    assert set(BAD_VALUES) == set(RunConfig.model_fields)


def _validate(path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["config", "validate", str(path)])
    return result.exit_code, result.output


CASES = [
    pytest.param(section, kind, id=f"{section}-{kind}")
    for section in BAD_VALUES
    for kind in ("unknown-key", "wrong-type", "out-of-range")
]


@pytest.mark.parametrize(("section", "kind"), CASES)
def test_bad_section_exits_2_naming_the_field(tmp_path, section, kind):
    (wrong_type, out_of_range) = BAD_VALUES[section]
    field, value = {
        "unknown-key": ("no_such_option", 1),
        "wrong-type": wrong_type,
        "out-of-range": out_of_range,
    }[kind]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({section: {field: value}}))
    code, output = _validate(path)
    assert code == 2, output
    flat = " ".join(output.split())
    assert f"{section}.{field}" in flat, output
    assert "Traceback" not in output
    if kind == "unknown-key":
        assert "allowed keys" in flat, output  # says what is allowed
    else:
        assert str(value) in flat or repr(value) in flat, output  # the value given


@pytest.mark.parametrize(
    "content",
    [b"train: [1, 2\n", b"- just\n- a list\n", b"train:\n  lr: \xff\xfe\n", b"serve: 5\n"],
    ids=["broken-yaml", "top-level-list", "invalid-utf8", "section-not-mapping"],
)
def test_malformed_file_exits_2(tmp_path, content):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    code, output = _validate(path)
    assert code == 2 and "Traceback" not in output, output


def _raylm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("raylm")), *args]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("RAY_ADDRESS", None)  # nothing here may need Ray: bad input fails before any work
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_missing_files_exit_2_in_a_real_process(tmp_path):
    missing = _raylm("config", "validate", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "config file not found" in missing.stderr, missing.stderr
    model = _raylm("serve", str(tmp_path / "no-model"), cwd=tmp_path)
    assert model.returncode == 2 and "no-model" in model.stderr, model.stderr[-2000:]
    for done in (missing, model):
        assert "Traceback" not in done.stdout + done.stderr
        assert "Started a local Ray instance" not in done.stderr  # refused before any work


def test_missing_corpus_fails_before_starting_ray(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "data": {"paths": [str(tmp_path / "no-corpus")]},
                "cluster": {"storage_path": str(tmp_path / "runs")},
            }
        )
    )
    corpus = _raylm("data", "prepare", str(run), cwd=tmp_path)
    assert corpus.returncode == 2 and "no-corpus" in corpus.stderr, corpus.stderr[-2000:]
    assert "Started a local Ray instance" not in corpus.stderr and "Traceback" not in corpus.stderr
