"""Connecting to Ray, and reading the connected cluster's nodes (for `raycls.cluster.preflight`)."""

from __future__ import annotations

import math
import os
import socket

import ray

from raycls.cluster.nodes import Node


def init_ray(
    address: str | None,
    *,
    needed_cpus: float = 1.0,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: bool = False,
    dashboard: bool = True,
) -> None:
    """Join a cluster (`--address auto|HOST:PORT|ray://host:10001`) or start a local one.

    A local Ray gets at least `needed_cpus` logical CPUs even on a 2-core laptop: trial actors and Train
    workers each hold a logical CPU while mostly waiting on each other, and without enough of them trials
    would wait for resources forever.

    The dashboard stays on: Ray Train V2 frees the placement group of a trial that Tune stopped (ASHA) only
    through the State API, which the dashboard serves; without it, every stopped multi-worker trial keeps
    its workers' CPUs/GPUs until the cluster is idle forever. The State API client in Ray's workers finds
    the cluster by address (else by the newest Ray started on their machine), so every worker is told the
    address: a local head is started on a known port, and a joined cluster's address is resolved first.
    `dashboard=False` (a local Ray whose trials never start a Ray Train run: one worker each) saves its
    start, about 1.5 s of a 2-core machine's Ray start.
    """
    if ray.is_initialized():
        return
    kwargs: dict = dict(log_to_driver=verbose, logging_level="INFO" if verbose else "WARNING")
    if address:
        gcs = None if address.startswith("ray://") else _resolve(address)
        runtime_env = {"env_vars": {"RAY_ADDRESS": gcs}} if gcs else None
        ray.init(address=gcs or address, runtime_env=runtime_env, **kwargs)
        return
    from ray._private.services import get_node_ip_address

    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the head
    try:
        ray.init(
            # "local": a new Ray of our own even when another runs on this machine (a second search, a test
            # cluster); without it ray.init joins the newest one and refuses num_cpus.
            address="local",
            num_cpus=num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus)),
            num_gpus=num_gpus,
            include_dashboard=dashboard,
            runtime_env={"env_vars": {"RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}},
            **kwargs,
        )
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _resolve(address: str) -> str | None:
    """HOST:PORT of the GCS for `auto` or an address; None when Ray cannot tell (ray.init then reports it)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)
    except Exception:
        return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def cluster_nodes() -> list[Node]:
    """The connected cluster's alive nodes, then the node types its autoscaler may add."""
    nodes = [Node(n["NodeID"], dict(n.get("Resources", {}))) for n in ray.nodes() if n.get("Alive")]
    return nodes + _autoscaler_node_types()


def _autoscaler_node_types() -> list[Node]:
    try:  # the autoscaler's ClusterConfig in the GCS (absent on a local Ray or a fixed cluster)
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        return []
    if config is None:
        return []
    return [
        Node(group.name, dict(group.resources), alive=False, count=int(group.max_count))
        for group in config.node_group_configs
        if group.max_count != 0
    ]
