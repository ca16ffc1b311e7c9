"""The batch engine in its own OS process, so its forward passes never wait for the replica's GIL.

Why a process: the tiny models this project serves spend most of a decode step in Python (per-op
dispatch), so the engine thread needs the GIL nearly all the time, and inside the replica it shares
that GIL with the asyncio loop and Ray Serve's threads. Measured by `benchmarks/serve_load.py` on the
2-core dev machine, a lone stream's engine thread cost 2.45 ms CPU per token in the replica against
1.4-1.8 ms for the same engine alone: the engine and the replica's loop effectively shared one core.
A child process has its own GIL (and can have its own core), and the replica keeps only HTTP work.

The replica (`EngineProcess`) starts the child with multiprocessing's "spawn" context (never fork a
process that holds torch or Ray threads; spawn is also what CUDA needs). The child loads the model
with `load_model` (the same loader the replica uses for encoder-decoder models), runs a `BatchEngine`
and talks over one pipe, in plain tuples and ints only:

- replica → child: ("submit", [SeqSpec, ...]), ("cancel", [sequence id, ...]), ("stats", reset_peak),
  ("stop",);
- child → replica: ("ready", context) or ("error", exception) once at start, then ONE ("step", outputs,
  running, step_s) per engine step carrying every `StepOutput` of the step, and ("stats", counters)
  answers.

The replica reads the pipe with `loop.add_reader` on the event loop that runs its requests: one
callback per engine step, no extra thread to wake. If the child dies the reader sees EOF and every
open request fails at once (`on_exit`); the replica's health check fails, so Serve replaces it. When
the replica goes away the child sees EOF on its end of the pipe and exits: no orphan process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from serve.engine import BatchEngine, Output, Sequence, check_fits
from serve.protocol import PromptScore, TopLogprobs
from serve.sampling import SamplingParams

log = logging.getLogger("ray.serve")

# (sequence id, prompt ids, max new tokens, stop ids, temperature, top_p, top_k, seed, logprobs k,
#  prompt logprobs?)
SeqSpec = tuple[int, list[int], int, tuple[int, ...], float, float, int, int | None, int | None, bool]
# (sequence id, token or None, finish reason or None, logprob, top logprobs, prompt logprobs)
StepOutput = tuple[int, int | None, str | None, float | None, TopLogprobs | None, list[PromptScore] | None]

START_TIMEOUT_S = 600.0  # loading a large model from a slow disk takes minutes
POLL_S = 1.0  # how often the child checks that its engine thread still runs


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when present (fp32 on CPU: exact padding math, no near-tie flips)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_model(model_path: str, encoder_decoder: bool = False) -> PreTrainedModel:
    """The one loader of served models: safetensors only (never unpickle weights), device and dtype
    from `pick_device`, eval mode."""
    device, dtype = pick_device()
    auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(model_path, dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.eval().to(device)


def _child(
    conn: Connection, model_path: str, pad_token_id: int, torch_threads: int, engine_kwargs: dict[str, Any]
) -> None:
    """The engine process: load, answer "ready", then serve submit/cancel/stats until stop or EOF."""
    torch.set_num_threads(torch_threads)
    try:
        model = load_model(model_path)
    except Exception as exc:  # the replica re-raises it, so a bad folder fails the replica's start
        try:
            conn.send(("error", exc))
        except Exception:  # an exception that does not pickle: its text is enough
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        return
    send_lock = threading.Lock()  # the engine thread (steps) and this thread (stats) share the pipe
    seqs: dict[int, Sequence] = {}

    def deliver(outputs: list[Output]) -> None:
        step: list[StepOutput] = []
        for o in outputs:
            if o.finish_reason is not None:
                seqs.pop(o.seq.owner, None)
            step.append((o.seq.owner, o.token, o.finish_reason, o.logprob, o.top, o.prompt_logprobs))
        with send_lock:
            conn.send(("step", step, engine.running, engine.step_s))

    engine = BatchEngine(model, pad_token_id, deliver=deliver, **engine_kwargs)
    engine.start()
    log.info("engine process ready: %s on %s (%s)", type(model).__name__, model.device, model.dtype)
    with send_lock:
        conn.send(("ready", engine.context))
    try:
        while engine.alive:
            if not conn.poll(POLL_S):
                continue
            msg = conn.recv()
            if msg[0] == "submit":
                batch = []
                for sid, prompt, max_new, stop, temp, top_p, top_k, seed, logprobs, prompt_lp in msg[1]:
                    params = SamplingParams(temperature=temp, top_p=top_p, top_k=top_k, seed=seed)
                    seq = Sequence(
                        prompt,
                        max_new,
                        frozenset(stop),
                        params,
                        owner=sid,
                        logprobs=logprobs,
                        prompt_logprobs=prompt_lp,
                    )
                    seqs[sid] = seq
                    batch.append(seq)
                engine.submit(batch)
            elif msg[0] == "cancel":
                engine.cancel([seqs[sid] for sid in msg[1] if sid in seqs])
            elif msg[0] == "stats":
                counters = engine.stats(msg[1])
                with send_lock:
                    conn.send(("stats", counters))
            elif msg[0] == "stop":
                break
    except (EOFError, OSError):
        pass  # the replica went away: stop with it
    finally:
        engine.stop()


class EngineProcess:
    """Replica side of the engine process: submit/cancel/stats over the pipe, step outputs to `on_step`.

    `running` and `step_s` are the engine's counters as of its last step (the stream cadence needs
    them every step, so they ride on each step message instead of a round trip).
    """

    def __init__(
        self,
        model_path: str,
        pad_token_id: int,
        torch_threads: int,
        on_step: Callable[[list[StepOutput]], None],
        on_exit: Callable[[], None],
        **engine_kwargs: Any,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_child,
            args=(child_conn, model_path, pad_token_id, torch_threads, engine_kwargs),
            name="raylm-engine",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self._on_step, self._on_exit = on_step, on_exit
        self.running = 0
        self.step_s = 0.0
        self.dead = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats: deque[asyncio.Future[dict[str, int]]] = deque()
        self.context = self._wait_ready()

    def _wait_ready(self) -> int:
        waited = 0.0
        while not self._conn.poll(POLL_S):
            waited += POLL_S
            if not self.process.is_alive() or waited > START_TIMEOUT_S:
                self.stop()
                raise RuntimeError(f"the engine process did not start (exit code {self.process.exitcode})")
        try:
            msg = self._conn.recv()
        except EOFError:
            self.stop()
            code = self.process.exitcode
            raise RuntimeError(f"the engine process died at start (exit code {code})") from None
        if msg[0] == "error":
            self.stop()
            raise msg[1]
        return msg[1]

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    @property
    def alive(self) -> bool:
        return not self.dead and self.process.is_alive()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the pipe on `loop` (the loop that runs the requests); once, at the first request."""
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._conn.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._died()
            return
        if msg[0] == "step":
            _, outputs, self.running, self.step_s = msg
            self._on_step(outputs)
        elif msg[0] == "stats" and self._stats:
            waiter = self._stats.popleft()
            if not waiter.done():
                waiter.set_result(msg[1])

    def _died(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._conn.fileno())
        self.dead, self.running = True, 0
        if not self._stopping:
            log.error("the engine process (pid %d) died with exit code %s", self.pid, self.process.exitcode)
        while self._stats:
            waiter = self._stats.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("the engine process died"))
        self._on_exit()

    def _send(self, msg: tuple) -> None:
        if self.dead:
            raise RuntimeError("the engine process died")
        self._conn.send(msg)

    def submit(self, specs: list[SeqSpec]) -> None:
        for spec in specs:  # here, so the caller gets the error (the child's would come back too late)
            check_fits(len(spec[1]), spec[2], self.context)
        self._send(("submit", specs))

    def cancel(self, ids: list[int]) -> None:
        if not self.dead:
            self._send(("cancel", ids))

    async def stats(self, reset_peak: bool = False) -> dict[str, int]:
        """The engine's counters, asked of the child (they change between steps too: cancels)."""
        self.attach(asyncio.get_running_loop())
        waiter = asyncio.get_running_loop().create_future()
        self._stats.append(waiter)
        self._send(("stats", reset_peak))
        return await waiter

    def stop(self) -> None:
        """Stop the child: ask, then terminate, then kill; never leave it running."""
        self._stopping = True
        if self.process.is_alive() and not self.dead:
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
