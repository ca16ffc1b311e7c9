"""`raylm cluster up|down|status`: a real multi-node Ray cluster on this host, for development and tests.

`up` starts a head (with dashboard and token auth) plus N-1 raylets, each its own Ray node, and records
them in a state file (RAYLM_STATE_DIR, default ~/.raylm), so `down` stops exactly those processes and
never another cluster on the machine (unlike `ray stop`).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cluster.auth import AuthError, client_token, ensure_local_token, explain_rejection
from cluster.commands._common import console, fail
from cluster.jobs_client import given_address_only
from cluster.local_cluster import LocalCluster, state_file

cluster_app = typer.Typer(
    help="Start, inspect and stop a local multi-node Ray cluster.", no_args_is_help=True
)


def _load_running() -> LocalCluster:
    cluster = LocalCluster.load(state_file())
    if cluster is None:
        fail(f"no cluster recorded in {state_file()}; start one with `raylm cluster up`")
    return cluster


def _last_line(exc: Exception) -> str:
    """The first line of a failed `ray start` plus the last line of its output, where Ray says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"


@cluster_app.command("up")
def up(
    nodes: Annotated[
        int, typer.Option("--nodes", "-n", min=1, help="Ray nodes in total (head included)")
    ] = 2,
    cpus_per_node: Annotated[
        int, typer.Option("--cpus-per-node", "-c", min=1, help="logical CPUs per node")
    ] = 2,
) -> None:
    """Start a head plus NODES-1 raylets on this host; prints the addresses to use."""
    previous = LocalCluster.load(state_file())
    if previous is not None and previous.is_up():
        fail(f"a cluster is already up (dashboard {previous.dashboard_url}); run `raylm cluster down` first")
    _, created = ensure_local_token()
    if created is not None:
        console.print(
            f"created a Ray auth token in {created} (mode 600): the cluster's nodes and clients use it",
            highlight=False,
        )
    try:
        with console.status(f"starting head node ({cpus_per_node} CPUs)"):
            cluster = LocalCluster.start(num_cpus=cpus_per_node, dashboard=True)
    except RuntimeError as exc:
        fail(f"starting the head node failed: {_last_line(exc)}")
    cluster.save(state_file())  # saved before the raylets, so a failure below can still be cleaned up
    try:
        for i in range(1, nodes):
            with console.status(f"starting node {i + 1}/{nodes} ({cpus_per_node} CPUs)"):
                cluster.add_node(num_cpus=cpus_per_node, name=f"node{i + 1}")
            cluster.save(state_file())
    except RuntimeError as exc:
        cluster.down()
        state_file().unlink(missing_ok=True)
        fail(f"starting node failed, cluster stopped: {_last_line(exc)}")
    console.print(
        f"[green]cluster up[/]: {nodes} node(s) x {cpus_per_node} CPUs, token auth on\n"
        f"  Ray address  {cluster.address}   (export RAY_ADDRESS={cluster.address})\n"
        f"  dashboard    {cluster.dashboard_url}\n"
        f"  submit with  raylm submit STAGE run.yaml --address {cluster.dashboard_url}\n"
        f"  state file   {state_file()}",
        highlight=False,
    )


@cluster_app.command("status")
def status() -> None:
    """Nodes of the recorded cluster with their state and resources."""
    from ray.exceptions import AuthenticationError
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    cluster = _load_running()
    if not cluster.is_up():
        fail(f"the cluster recorded in {state_file()} is not running; `raylm cluster down` clears the record")
    token = None
    try:
        token = client_token(cluster.dashboard_url)
        headers = {"Content-Type": "application/json", **(token.headers() if token else {})}
        with given_address_only():
            client = StateApiClient(address=cluster.dashboard_url, headers=headers)
        found = client.list(
            StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
        )
    except AuthError as exc:
        fail(str(exc))
    except AuthenticationError as exc:
        fail(explain_rejection(cluster.dashboard_url, exc.message, token))
    except Exception as exc:  # the State API raises bare exceptions for HTTP failures
        fail(f"cannot query {cluster.dashboard_url}: {exc}")
    alive = [n for n in found if n.state == "ALIVE"]
    table = Table(title=f"{len(alive)} node(s) alive at {cluster.dashboard_url}", title_justify="left")
    for col in ("node id", "ip", "role", "state", "CPU", "memory GiB", "object store GiB"):
        table.add_column(col)
    for n in sorted(found, key=lambda n: (not n.is_head_node, n.node_id)):
        res = n.resources_total or {}
        table.add_row(
            n.node_id[:12],
            n.node_ip,
            "head" if n.is_head_node else "worker",
            n.state,
            f"{res.get('CPU', 0):g}",
            f"{res.get('memory', 0) / 2**30:.1f}",
            f"{res.get('object_store_memory', 0) / 2**30:.1f}",
        )
    console.print(table)
    console.print(f"processes: {len(cluster.pids())}  Ray address: {cluster.address}", highlight=False)


@cluster_app.command("down")
def down() -> None:
    """Stop every process of the recorded cluster (and nothing else), then forget it."""
    cluster = _load_running()
    with console.status("stopping cluster processes"):
        stopped = cluster.down()
    state_file().unlink(missing_ok=True)
    console.print(f"[green]cluster down[/]: stopped {stopped} process(es)")


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
