"""What a trial asks of the cluster: its workers' CPUs/GPUs and the Tune trial's own bundle.

Spot instances: a cluster declares the custom resource `on_demand` (``{"on_demand": 1}``) on its non-spot
nodes (the head, in the YAMLs under cluster/). When it does, the coordinator of a multi-worker trial (the
Tune trial actor that drives the Ray Train run; Train V2 puts its controller on the same node) asks for a
token share of it (`ON_DEMAND_SHARE`), so losing a spot node costs a worker-group restart from the last
checkpoint, never the trial's driver. One-worker trials train inside the trial actor and are not pinned:
they are the workers, and Tune retries them from their last checkpoint (`experiment.max_failures`).
"""

from __future__ import annotations

from raycls.config.experiment import Resources

# The custom resource non-spot nodes declare, and the share of it a trial's coordinator asks for.
ON_DEMAND = "on_demand"
ON_DEMAND_SHARE = 0.001
# What the coordinator of a multi-worker trial holds: Tune refuses an empty request.
COORDINATOR_CPU = 0.01


def worker_request(resources: Resources) -> dict[str, float]:
    """What one trial worker holds (one-worker trials: the trial actor itself)."""
    return {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if resources.gpu else {})}


def per_trial_request(resources: Resources) -> dict[str, float]:
    return {
        "CPU": resources.workers * resources.cpus_per_worker,
        "GPU": resources.workers * resources.gpus_per_worker if resources.gpu else 0.0,
    }


def local_cpus_needed(resources: Resources, concurrent: int = 1) -> float:
    """Logical CPUs a local Ray needs for `concurrent` trials of `resources` at once, and the driver's one."""
    return per_trial_request(resources)["CPU"] * concurrent + 1


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
