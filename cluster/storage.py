"""Find runs and their checkpoints under `cluster.storage_path`, a local folder or any pyarrow URI.

A job submitted to a remote cluster writes its run folder (`<storage_path>/<run_name>`, see
`RunConfig.run_dir`) where the cluster can reach it, often object storage. `raylm export` and
`raylm serve` run later, elsewhere, knowing only the run name: this module turns that name back into a
run folder and its newest complete checkpoint, through `pyarrow.fs` so s3://, gs://, hdfs:// and
file:// work the same as a plain path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from jobs.checkpointing import COMPLETE_MARKER, META_FILE

CHECKPOINT_PREFIX = "checkpoint_"
# Ray Train puts checkpoints directly in the run folder; a stage may nest its own storage one level down.
_SEARCH_DEPTH = 2


class RunNotFound(Exception):
    """No run (or no usable checkpoint) by that name; `str()` lists what is there."""


def _is_uri(path: str) -> bool:
    return "://" in path


def open_storage(storage_path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; bad URIs raise RunNotFound."""
    if not _is_uri(storage_path):
        return pafs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(storage_path)
    except (pafs.ArrowInvalid, OSError, ValueError) as exc:
        raise RunNotFound(f"cannot open storage {storage_path!r}: {exc}") from None


def _join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder: its address as the user would pass it on, and its training step."""

    uri: str
    step: int


@dataclass(frozen=True)
class Run:
    """A run folder under a storage path."""

    name: str
    uri: str
    fs: pafs.FileSystem
    path: str

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def _uri_of(self, fs_path: str) -> str:
        rel = fs_path[len(self.path) :].lstrip("/")
        return _join_uri(self.uri, rel) if rel else self.uri

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints (the COMPLETE marker was written last), newest step first."""
        if not self.exists():
            return []
        found = []
        for info in self._dirs_within(self.path, _SEARCH_DEPTH):
            if not info.base_name.startswith(CHECKPOINT_PREFIX):
                continue
            marker = self.fs.get_file_info(f"{info.path}/{COMPLETE_MARKER}")
            if marker.type != pafs.FileType.File:
                continue
            found.append(Checkpoint(self._uri_of(info.path), self._step(info.path)))
        return sorted(found, key=lambda c: (c.step, c.uri), reverse=True)

    def _dirs_within(self, path: str, depth: int) -> list[pafs.FileInfo]:
        """Folders up to `depth` levels below `path` (not deeper: object stores list slowly)."""
        children = [
            i
            for i in self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if i.type == pafs.FileType.Directory
        ]
        if depth <= 1:
            return children
        return children + [d for c in children for d in self._dirs_within(c.path, depth - 1)]

    def _step(self, ckpt_path: str) -> int:
        try:
            with self.fs.open_input_stream(f"{ckpt_path}/{META_FILE}") as f:
                return int(json.loads(f.read())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    def latest_checkpoint(self) -> Checkpoint:
        """The newest complete checkpoint; RunNotFound when the run has none yet."""
        ckpts = self.checkpoints()
        if not ckpts:
            raise RunNotFound(f"run {self.name!r} at {self.uri} has no complete checkpoint yet")
        return ckpts[0]


def run_at(storage_path: str, run_name: str) -> Run:
    """The run folder `<storage_path>/<run_name>`, whether or not it exists yet."""
    fs, base = open_storage(storage_path)
    uri = storage_path if _is_uri(storage_path) else base
    return Run(run_name, _join_uri(uri, run_name), fs, _join_uri(base, run_name))


def list_runs(storage_path: str) -> list[str]:
    """Names of the run folders under `storage_path` (empty when the storage does not exist yet)."""
    fs, base = open_storage(storage_path)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def find_run(storage_path: str, run_name: str) -> Run:
    """The existing run `run_name`; RunNotFound naming the runs that do exist otherwise."""
    run = run_at(storage_path, run_name)
    if not run.exists():
        present = list_runs(storage_path)
        listing = ", ".join(present) if present else "none"
        raise RunNotFound(f"no run {run_name!r} under {storage_path} (runs there: {listing})")
    return run


def resolve_checkpoint(ref: str, storage_path: str) -> str:
    """A checkpoint to export or serve from `ref`: a checkpoint folder, a run folder, or a run name.

    Folders and URIs are taken as given (a run folder resolves to its newest complete checkpoint); a
    bare name is looked up under `storage_path`. Returns a local path or URI.
    """
    looks_like_path = _is_uri(ref) or "/" in ref or Path(ref).exists()
    if looks_like_path:
        parent, _, name = ref.rstrip("/").rpartition("/")
        run = run_at(parent or ".", name)
        if not run.exists():
            raise RunNotFound(f"{ref} is not a folder")
        if run.fs.get_file_info(f"{run.path}/{COMPLETE_MARKER}").type == pafs.FileType.File:
            return run.uri
        return run.latest_checkpoint().uri
    return find_run(storage_path, ref).latest_checkpoint().uri
