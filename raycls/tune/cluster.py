"""Connecting to Ray, and fitting trials to the cluster's resources."""

from __future__ import annotations

import math
import os
import socket

import ray

from raycls.config.experiment import Resources
from raycls.errors import RayclsError


def init_ray(
    address: str | None,
    *,
    needed_cpus: float = 1.0,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: bool = False,
) -> None:
    """Join a cluster (`--address auto|ray://host:10001`) or start a local one.

    A local Ray gets at least `needed_cpus` logical CPUs even on a 2-core laptop: trial actors and Train
    workers each hold a logical CPU while mostly waiting on each other, and without enough of them trials
    would wait for resources forever.

    The dashboard stays on: Ray Train V2 frees the placement group of a trial that Tune stopped (ASHA) only
    through the State API, which the dashboard serves; without it, every stopped multi-worker trial keeps
    its workers' CPUs/GPUs until the cluster is idle forever. The State API client in Ray's workers finds
    the cluster by address, so a local head is started on a known port and every worker is told it
    (otherwise a second Ray on the same machine, e.g. beside a test run, makes that lookup fail).
    """
    if ray.is_initialized():
        return
    kwargs: dict = dict(log_to_driver=verbose, logging_level="INFO" if verbose else "WARNING")
    if address:
        ray.init(address=address, **kwargs)
        return
    from ray._private.services import get_node_ip_address

    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the head
    try:
        ray.init(
            num_cpus=num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus)),
            num_gpus=num_gpus,
            runtime_env={"env_vars": {"RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}},
            **kwargs,
        )
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def trial_bundle(resources: Resources) -> dict[str, float]:
    """What the Tune trial itself holds. One-worker trials train inside it; multi-worker trials only
    drive a Ray Train run whose workers request their own CPUs/GPUs, so the trial holds a token share of a
    CPU (Tune refuses an empty request) and never competes with the workers for cores or GPUs."""
    if resources.workers == 1:
        return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker if resources.gpu else 0.0}
    return {"cpu": 0.01, "gpu": 0.0}


def per_trial_request(resources: Resources) -> dict[str, float]:
    return {
        "CPU": resources.workers * resources.cpus_per_worker,
        "GPU": resources.workers * resources.gpus_per_worker if resources.gpu else 0.0,
    }


def default_concurrency(resources: Resources, cluster: dict[str, float]) -> int:
    """Trials that fit the cluster at once: by GPUs when trials use GPUs, else by CPUs."""
    need = per_trial_request(resources)
    kind = "GPU" if need["GPU"] > 0 else "CPU"
    have = cluster.get(kind, 0.0)
    if have < need[kind]:
        raise RayclsError(
            f"experiment.resources asks {need[kind]:g} {kind} per trial "
            f"({resources.workers} workers), but the cluster has {have:g}: no trial could ever start"
        )
    return max(1, int(have // need[kind]))
