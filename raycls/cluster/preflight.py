"""Fitting trials to the cluster's nodes before any trial starts.

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

Pure functions of the nodes (`raycls.cluster.nodes.Node`): no Ray here, so they are tested on made-up clusters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from raycls.cluster.nodes import Node
from raycls.cluster.resources import ON_DEMAND, worker_request
from raycls.config.experiment import Resources
from raycls.errors import RayclsError
from raycls.storage import is_local

# Set to 1 when a plain path is a folder every node mounts at the same place.
SHARED_STORAGE_ENV = "RAYCLS_SHARED_STORAGE"
_EPS = 1e-9


def shared_storage_from_env() -> bool:
    return os.environ.get(SHARED_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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
    if is_local(storage) and not shared_storage and (len(alive) > 1 or may_grow):
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
