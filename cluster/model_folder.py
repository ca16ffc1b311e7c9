"""Check a Hugging Face model folder before anything starts serving or evaluating it.

A broken folder (a truncated `model.safetensors`, a missing shard, a config that does not parse) is
otherwise found by a Serve replica loading it: the replica dies, Serve retries, and the terminal
shows the controller's traceback. Reading a few headers here costs milliseconds and ends the command
with one line naming the file and the problem (exit 2) before Ray is started.

Only metadata is read: JSON files and the safetensors header (8-byte length + JSON), never tensors,
and never a pickle (`.bin` weights are refused, not loaded).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from cluster.config import UserError

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses larger headers
# Element sizes of the safetensors dtypes (https://github.com/huggingface/safetensors, format spec).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# One of these holds the vocabulary, depending on the tokenizer family.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class ModelFolderError(UserError):
    """The folder cannot be served or evaluated; the message names the file and the problem."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: missing") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None


def check_safetensors(path: Path) -> int:
    """Raise ModelFolderError unless `path` has a parseable header whose tensors fill the file exactly.

    Returns the number of tensors.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFolderError(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ModelFolderError(
                f"{path}: header length {n} does not fit the file's {size} bytes "
                "(truncated, or not safetensors)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ModelFolderError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: safetensors header is not a JSON object")
    end = 0
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        try:
            start, stop = info["data_offsets"]
            want = math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if stop - start != want:
            raise ModelFolderError(
                f"{path}: tensor {name!r} spans {stop - start} bytes, its shape and dtype need {want}"
            )
        end = max(end, stop)
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ModelFolderError(f"{path}: {size} bytes but its header describes {expected} ({what})")
    return len(tensors)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        parsed = _json(index)
        weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"{index}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelFolderError(f"{f}: missing (named by {INDEX_FILE})")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: pickle weights are never loaded)" if pickles else ""
        raise ModelFolderError(f"{folder}: no *.safetensors weights{hint}")
    return files


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """Raise ModelFolderError unless `folder` is a complete HF model folder; returns what was checked.

    Checks: config.json parses; every weight file (from the index, else *.safetensors) exists and its
    header parses and matches its byte size; tokenizer_config.json parses and a vocabulary file exists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    config = _json(folder / "config.json")
    if not isinstance(config, dict):
        raise ModelFolderError(f"{folder / 'config.json'}: not a JSON object")
    weights = _weight_files(folder)
    tensors = sum(check_safetensors(f) for f in weights)
    _json(folder / "tokenizer_config.json")
    vocab = [name for name in VOCAB_FILES if (folder / name).is_file()]
    if not vocab:
        raise ModelFolderError(f"{folder}: no tokenizer vocabulary (none of {', '.join(VOCAB_FILES)})")
    if vocab[0] == "tokenizer.json":
        _json(folder / "tokenizer.json")
    return {"weights": [f.name for f in weights], "tensors": tensors, "tokenizer": vocab[0]}


def check_local_model_folder(path: str | None) -> None:
    """The same check for a path that may live elsewhere (a URI, a path inside a pod): local folders only."""
    if path and "://" not in path and Path(path).is_dir():
        check_model_folder(path)


def check_run_exports(run_dir: str) -> None:
    """Check every exported model of a run that `raylm eval` will load (local run folders only)."""
    from data_pipelines.layout import EXPORT_NAMES, RunLayout

    if "://" in run_dir:
        return
    for name in EXPORT_NAMES:
        folder = RunLayout(Path(run_dir)).export(name)
        if (folder / "config.json").exists():
            check_model_folder(folder)
