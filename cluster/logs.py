"""Library output to a log file, raylm's own output to the terminal.

Ray forwards every worker's stdout/stderr to the driver (DeepSpeed and torch warnings from the train
workers, Serve replica logs, Ray Data notices), and Ray's C++ core, DeepSpeed and the `warnings` module
write to the driver's file descriptors 1 and 2 directly. Filtering those streams line by line would
be a guessing game, so `library_output_to` works one level lower: it points fds 1 and 2 at a log file
(everything the libraries print, in order, lands there) and hands back new streams on the original
terminal, to which raylm's own consoles are pointed. `--verbose` or RAYLM_VERBOSE=1 skips all of it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console

from data_pipelines.layout import RunLayout

VERBOSE_ENV = "RAYLM_VERBOSE"


def verbose() -> bool:
    """True when the user asked for the libraries' full output (RAYLM_VERBOSE set and not 0/false)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(flag: bool) -> bool:
    """Turn `--verbose` into RAYLM_VERBOSE=1 (inherited by locally started Ray workers); returns verbose()."""
    if flag:
        os.environ[VERBOSE_ENV] = "1"
    return verbose()


def log_file_for(run_dir: str, command: str) -> Path:
    """`<run>/logs/<command>-<time>.log`; a remote run folder (s3://…) keeps its log in the temp folder."""
    base = Path(run_dir) if "://" not in run_dir else Path("/tmp") / "raylm-logs" / Path(run_dir).name
    return RunLayout(base).log_file(command)


@dataclass
class Terminal:
    """Streams on the user's terminal while the process's fds 1 and 2 write to `log_path`."""

    out: TextIO
    err: TextIO
    log_path: Path


@contextmanager
def library_output_to(
    log_path: Path, *consoles: Console, stderr_consoles: tuple[Console, ...] = ()
) -> Iterator[Terminal]:
    """Send fds 1 and 2 to `log_path` for the duration; `consoles` (and `stderr_consoles`) keep printing
    on the terminal. On exit the descriptors and consoles are put back, so an exception raised out of
    the block prints its traceback on the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    terminal = Terminal(
        os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace"),
        os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace"),
        log_path,
    )
    previous = [(c, c._file) for c in (*consoles, *stderr_consoles)]
    for c in consoles:
        c.file = terminal.out
    for c in stderr_consoles:
        c.file = terminal.err
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for c, file in previous:
            c._file = file
        terminal.out.close()
        terminal.err.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
