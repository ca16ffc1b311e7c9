"""A real multi-node Ray cluster on one host: a head plus extra raylets, each its own node.

Used by `raylm cluster up|down|status` for development and by the test suite. Every process is found
through the cluster's own temp dir, so `down` stops exactly this cluster's processes and nothing else
(never `ray stop`, which kills every Ray process on the machine).

Each extra raylet gets its own temp dir below the head's. Ray's runtime-env agent unpacks a job's
`working_dir` into `<temp dir>/<session>/runtime_resources/working_dir_files/<package>` and, when a
worker of that job first starts on its node, deletes and re-unpacks that folder
(`download_and_unpack_package(..., overwrite=True)`). Sharing the head's temp dir, the raylets would
all write the same path on one host, so a train worker starting on a second node deleted the folder
the job driver was running in (`FileNotFoundError` from `os.getcwd()`). On real hosts every node has
its own disk, which per-node temp dirs reproduce.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

# Token auth stays on: every node and every client of a raylm-started cluster must present the token.
AUTH_ENV = {"RAY_AUTH_MODE": "token"}

_START_ATTEMPTS = 3

STATE_FILE = Path(os.environ.get("RAYLM_STATE_DIR", Path.home() / ".raylm")) / "local-cluster.json"


def state_file() -> Path:
    """Where `raylm cluster up` records its cluster, read from RAYLM_STATE_DIR at call time (tests set it)."""
    return Path(os.environ.get("RAYLM_STATE_DIR", Path.home() / ".raylm")) / "local-cluster.json"


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are chosen, since the OS may hand a
    port it just released to the very next bind (a head once got one port for two of its components)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


_AGENT_PORT_FLAGS = (
    "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port",
)
# Failures of `ray start` worth one more try: the raylet's fixed 30 s registration window on a loaded
# host, and a chosen port taken by another process between choosing it and binding it.
_RETRYABLE_START_ERRORS = ("timed out during startup", "is used by other components", "already in use")


def _ray_bin() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def node_env(address: str) -> dict[str, str]:
    """Environment of the Ray processes we start for the cluster at `address`.

    - token auth on;
    - `python` is this interpreter: job entrypoints are shell commands (`python -m cluster.run_stage
      pretrain`) run with the raylets' PATH, so this interpreter's bin dir goes first, whether or not the user
      activated the virtualenv;
    - RAY_ADDRESS is this cluster: processes Ray starts inherit it, and some of Ray's own (Ray Train's
      PlacementGroupCleaner) call `ray.init()` with no address, which fails with "Found multiple
      active Ray instances" when other clusters run on the host.
    """
    env = {**os.environ, **AUTH_ENV, "RAY_ADDRESS": address}
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p)])
    return env


@dataclass
class LocalCluster:
    """Handle on a head and its extra nodes; serialisable so another process can stop it."""

    temp_dir: str
    gcs_port: int
    dashboard_port: int
    nodes: list[dict] = field(default_factory=list)  # {"name", "pids"} per extra node

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # ---- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def start(cls, num_cpus: int = 4, dashboard: bool = True, resources: dict | None = None) -> LocalCluster:
        """Start a head node on free ports (so several clusters can coexist on one host).

        Ray gives a new raylet a fixed 30 s to register with the GCS; on an overloaded host that window
        can pass, so that one failure is retried (the half-started head is stopped first). A token is
        created first when there is none, since a head with token auth on refuses to start without.
        """
        from cluster.auth import ensure_local_token

        ensure_local_token()
        for _ in range(_START_ATTEMPTS - 1):
            try:
                return cls._start_once(num_cpus, dashboard, resources)
            except RuntimeError as exc:
                if not any(reason in str(exc) for reason in _RETRYABLE_START_ERRORS):
                    raise
        return cls._start_once(num_cpus, dashboard, resources)

    @classmethod
    def _start_once(cls, num_cpus: int, dashboard: bool, resources: dict | None) -> LocalCluster:
        # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
        temp_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")
        gcs_port, dashboard_port, *agent_ports = free_ports(2 + len(_AGENT_PORT_FLAGS))
        cluster = cls(temp_dir=temp_dir, gcs_port=gcs_port, dashboard_port=dashboard_port)
        cmd = [
            _ray_bin(), "start", "--head",
            f"--port={cluster.gcs_port}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={cluster.dashboard_port}",
            *cls._port_flags(agent_ports),
            "--disable-usage-stats",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        try:
            cluster._run(cmd)
        except BaseException:
            # A head that timed out during startup may have left a GCS, raylet or dashboard running.
            cluster.down()
            raise
        return cluster

    @staticmethod
    def _port_flags(ports: list[int]) -> list[str]:
        # Fixed defaults (10001, 52365, ...) would collide between clusters on one host.
        return [f"{flag}={port}" for flag, port in zip(_AGENT_PORT_FLAGS, ports, strict=True)]

    def add_node(self, num_cpus: int = 2, resources: dict | None = None, name: str | None = None) -> dict:
        """Start one more raylet joined to the head: a separate node with its own object store."""
        before = {p.pid for p in self._processes()}
        # Its own temp dir (see the module docstring); under the head's, so `down` finds and removes it.
        node_temp = tempfile.mkdtemp(prefix="n", dir=self.temp_dir)
        cmd = [
            _ray_bin(), "start", f"--address={self.address}", f"--num-cpus={num_cpus}",
            f"--temp-dir={node_temp}", *self._port_flags(free_ports(len(_AGENT_PORT_FLAGS))),
            "--disable-usage-stats",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._run(cmd)
                break
            except RuntimeError as exc:
                # Same fixed 30 s registration window as the head: stop the half-started raylet, retry.
                self._kill_all(p for p in self._processes() if p.pid not in before)
                if "timed out during startup" not in str(exc) or attempt == _START_ATTEMPTS:
                    raise
        time.sleep(1.0)
        new = sorted(p.pid for p in self._processes() if p.pid not in before)
        node = {"name": name or f"node{len(self.nodes) + 1}", "pids": new}
        self.nodes.append(node)
        return node

    def remove_node(self, node: dict, sig: int = signal.SIGKILL) -> None:
        """Kill one extra node's processes (a node failure, from Ray's point of view)."""
        for pid in node["pids"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        self.nodes = [n for n in self.nodes if n is not node and n["name"] != node["name"]]

    def down(self) -> int:
        """Stop every process of this cluster; returns how many were signalled."""
        stopped = self._kill_all(self._processes())
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return stopped

    @staticmethod
    def _kill_all(processes) -> int:
        """SIGTERM, wait up to 10 s, then SIGKILL the rest; returns how many were signalled."""
        procs = list(processes)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        return len(procs)

    def pids(self) -> list[int]:
        """Process ids of this cluster's live processes (head, extra raylets, their workers)."""
        return sorted(p.pid for p in self._processes())

    def is_up(self) -> bool:
        """Whether any process of this cluster is still running (a stale state file says nothing)."""
        return bool(self._processes())

    # ---- helpers ---------------------------------------------------------------------------------
    def _processes(self) -> list[psutil.Process]:
        """Processes whose command line names this cluster's temp dir or GCS port."""
        marks = (self.temp_dir, f":{self.gcs_port}")
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if p.pid != os.getpid() and any(m in cmdline for m in marks):
                found.append(p)
        return found

    def _run(self, cmd: list[str]) -> None:
        env = node_env(self.address)
        # Ray waits 60 s for the dashboard by default; a loaded 2-core host can need longer.
        env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "180")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if res.returncode != 0:
            output = f"{res.stdout[-2000:]}{res.stderr[-2000:]}"
            raise RuntimeError(f"{' '.join(cmd[:3])} failed ({res.returncode}):\n{output}")

    # ---- persistence for the CLI ------------------------------------------------------------------
    def save(self, path: Path = STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path = STATE_FILE) -> LocalCluster | None:
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))
