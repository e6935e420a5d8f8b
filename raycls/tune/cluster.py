"""Connecting to Ray, and fitting trials to the cluster's nodes before any trial starts.

`preflight` runs once, right after `init_ray`, and refuses (with a `RayclsError` that says what to change)
the set-ups that Ray itself would only punish later:

- a node-local storage path on a multi-node cluster: trials on other nodes write their checkpoints to their
  own disks and Tune fails at the first checkpoint sync. Object storage (s3://, gs://, ...) is fine, and so is
  a folder every node mounts at the same path (NFS, EFS, a shared disk) once the user says so:
  `RAYCLS_SHARED_STORAGE=1` (or `TuneOptions.shared_storage`);
- per-worker resources that no node can hold (8 CPUs per worker on 4-CPU nodes, a GPU on a CPU-only
  cluster): Ray would keep the trial pending forever, silently;
- and it computes the default concurrency per node (a worker never spans nodes): three 1-GPU nodes hold
  one 2-worker 1-GPU-per-worker trial at a time, not 1.5.

Nodes an autoscaler may add count as nodes (their shapes come from the cluster config in the GCS), so a
cluster that starts with only its head is not refused.

Spot instances: a cluster declares the custom resource `on_demand` (``{"on_demand": 1}``) on its non-spot
nodes (the head, in the YAMLs under cluster/). When it does, the coordinator of a multi-worker trial (the
Tune trial actor that drives the Ray Train run; Train V2 puts its controller on the same node) asks for a
token share of it (`ON_DEMAND_SHARE`), so losing a spot node costs a worker-group restart from the last
checkpoint, never the trial's driver. One-worker trials train inside the trial actor and are not pinned:
they are the workers, and Tune retries them from their last checkpoint (`experiment.max_failures`).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray

from raycls.config.experiment import Resources
from raycls.errors import RayclsError

# The custom resource non-spot nodes declare, and the share of it a trial's coordinator asks for.
ON_DEMAND = "on_demand"
ON_DEMAND_SHARE = 0.001
# What the coordinator of a multi-worker trial holds: Tune refuses an empty request.
COORDINATOR_CPU = 0.01
# Set to 1 when a plain path is a folder every node mounts at the same place.
SHARED_STORAGE_ENV = "RAYCLS_SHARED_STORAGE"
_EPS = 1e-9


def init_ray(
    address: str | None,
    *,
    needed_cpus: float = 1.0,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: bool = False,
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


# ------------------------------------------------------------------------------------------ requests
def worker_request(resources: Resources) -> dict[str, float]:
    """What one trial worker holds (one-worker trials: the trial actor itself)."""
    return {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if resources.gpu else {})}


def per_trial_request(resources: Resources) -> dict[str, float]:
    return {
        "CPU": resources.workers * resources.cpus_per_worker,
        "GPU": resources.workers * resources.gpus_per_worker if resources.gpu else 0.0,
    }


def trial_bundle(resources: Resources, *, pin_on_demand: bool = False) -> dict[str, float]:
    """What the Tune trial itself holds. One-worker trials train inside it; multi-worker trials only
    drive a Ray Train run whose workers request their own CPUs/GPUs, so the trial holds a token share of a
    CPU (Tune refuses an empty request) and never competes with the workers for cores or GPUs. On a
    cluster with non-spot nodes it holds a token share of `on_demand` instead, which keeps it on one of
    them, even on a head started with no CPUs for tasks (`num_cpus: 0`, as cluster YAMLs often do)."""
    if resources.workers == 1:
        return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker if resources.gpu else 0.0}
    if pin_on_demand:
        return {"cpu": 0.0, "gpu": 0.0, ON_DEMAND: ON_DEMAND_SHARE}
    return {"cpu": COORDINATOR_CPU, "gpu": 0.0}


# ----------------------------------------------------------------------------------------------- nodes
@dataclass(frozen=True)
class Node:
    """An alive node, or a node type the autoscaler may start (`count` of them; -1: no limit)."""

    name: str
    resources: dict[str, float] = field(default_factory=dict)
    alive: bool = True
    count: int = 1

    def describe(self, keys: Sequence[str]) -> str:
        have = ", ".join(f"{k}={self.resources.get(k, 0.0):g}" for k in keys)
        if self.alive:
            return f"node {self.name[:12]} ({have})"
        count = "any number of" if self.count < 0 else self.count
        return f"autoscaler node type {self.name} ({have}, up to {count} nodes)"


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
    return [Node(group.name, dict(group.resources), alive=False, count=int(group.max_count))
            for group in config.node_group_configs if group.max_count != 0]  # fmt: skip


def is_local_path(storage: str) -> bool:
    return "://" not in storage or storage.startswith("file://")


def shared_storage_from_env() -> bool:
    return os.environ.get(SHARED_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------------- preflight
@dataclass(frozen=True)
class Plan:
    concurrency: int
    pin_on_demand: bool  # the cluster declares `on_demand`: multi-worker coordinators ask for a share
    nodes: int  # alive nodes


def preflight(
    resources: Resources,
    storage: str,
    nodes: Sequence[Node],
    *,
    concurrency: int | None = None,
    shared_storage: bool = False,
) -> Plan:
    """Refuse what could never run on these nodes; say how many trials fit at once."""
    alive = [n for n in nodes if n.alive]
    # An autoscaler whose node types add up to more than one node makes a multi-node cluster, later.
    may_grow = sum(n.count if n.count >= 0 else 2 for n in nodes if not n.alive) > 1
    if is_local_path(storage) and not shared_storage and (len(alive) > 1 or may_grow):
        where = f"{len(alive)} nodes" if len(alive) > 1 else "an autoscaler that adds nodes"
        raise RayclsError(
            f"storage {storage!r} is a folder on this machine, but the cluster has {where}: trials on other "
            f"nodes would checkpoint to their own disks and Ray Tune fails at the first checkpoint sync. Use "
            f"object storage (--storage s3://bucket/path or gs://...), or a folder every node mounts at the same "
            f"path (NFS, EFS, a shared disk) and say so with {SHARED_STORAGE_ENV}=1 (raycls tune --shared-storage)"
        )
    check_fits(resources, nodes)
    pin = resources.workers > 1 and any(n.resources.get(ON_DEMAND, 0.0) > 0 for n in nodes)
    return Plan(concurrency or default_concurrency(resources, nodes, pinned=pin), pin, len(alive))


def check_fits(resources: Resources, nodes: Sequence[Node]) -> None:
    """Every worker must fit on one node (Ray never splits a bundle), and the workers on the cluster."""
    need = worker_request(resources)
    keys = list(need)
    if not any(_fits(n.resources, need) for n in nodes):
        capacities = "; ".join(n.describe(keys) for n in nodes) or "no nodes"
        asks = ", ".join(f"{k}={v:g}" for k, v in need.items())
        raise RayclsError(
            f"experiment.resources asks {asks} per worker (cpus_per_worker, gpus_per_worker), but no node has "
            f"that much: {capacities}. Ray would keep every trial pending forever; lower the request or add a "
            f"node that holds it"
        )
    slots = worker_slots(need, nodes)
    if slots < resources.workers:
        total = ", ".join(f"{k}={sum(n.resources.get(k, 0.0) * max(n.count, 1) for n in nodes):g}" for k in keys)
        raise RayclsError(
            f"experiment.resources asks {resources.workers} workers of "
            f"{', '.join(f'{k}={v:g}' for k, v in need.items())}, but the cluster holds {slots} such workers at "
            f"most ({total} over {len(nodes)} nodes): no trial could ever start"
        )


def _fits(have: dict[str, float], need: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + _EPS >= v for k, v in need.items() if v > 0)


def worker_slots(need: dict[str, float], nodes: Sequence[Node], *, unbounded: int = 1024) -> int:
    """Workers that fit at once, node by node (a worker's CPUs and GPUs come from one node)."""
    total = 0
    for node in nodes:
        per_node = min((int(node.resources.get(k, 0.0) / v + _EPS) for k, v in need.items() if v > 0), default=0)
        copies = node.count if node.count >= 0 else unbounded
        total += per_node * copies
    return total


def default_concurrency(resources: Resources, nodes: Sequence[Node], *, pinned: bool = False) -> int:
    """Trials that fit the cluster at once, counted per node: by GPUs and CPUs together.

    An unpinned multi-worker trial's coordinator holds COORDINATOR_CPU somewhere, which takes a whole worker
    slot on a node whose CPUs are otherwise all given to workers: one slot is set aside for them.
    """
    slots = worker_slots(worker_request(resources), nodes)
    if resources.workers > 1 and not pinned:
        slots -= 1
    return max(1, slots // resources.workers)
