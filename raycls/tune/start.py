"""A search's first steps, before Ray Tune is imported: every check, then Ray coming up.

    storage reachable -> raycls.prepare (every check, references resolved) -> Ray starting (`RayStart`)

`raycls tune` runs these and only then imports the driver (Ray Tune, Optuna, the ledger: ~2 s on 2 cores), so
Ray's own start (4-5 s) overlaps that import instead of following it; `run_tune` runs them itself for
library callers (Ray then starts on the caller's thread, as `ray.init` always did). Either way no Ray starts
for an experiment that a check refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from raycls.allocator import bound_malloc_arenas
from raycls.config.experiment import Experiment
from raycls.prepare import prepare_experiment
from raycls.storage import absolute, filesystem
from raycls.tune.cluster import RayStart, search_ray


@dataclass(frozen=True)
class TuneOptions:
    storage: str
    address: str | None = None
    resume: bool = False
    wandb_mode: str | None = None  # overrides the YAML's wandb.mode
    num_cpus: int | None = None  # logical CPUs of a local Ray (default: enough for the trials)
    verbose: bool = False
    live: bool = True
    # A plain --storage path that every node mounts at the same place (NFS, EFS); None: $RAYCLS_SHARED_STORAGE.
    shared_storage: bool | None = None
    # Ended trials keep only what Tune reads again (tune.ledger.EndedTrialTrimmer); False: Tune's default,
    # for benchmarks/cluster_scaling.py to measure the driver's memory both ways.
    bounded_state: bool = True


@dataclass(frozen=True)
class StartedSearch:
    experiment: Experiment  # checked, its references resolved against the storage
    storage: str  # absolute
    ray: RayStart


def start_search(experiment: Experiment, options: TuneOptions, *, background: bool = True) -> StartedSearch:
    """The checks, then Ray: on a thread of its own (`background`), or on this one before returning."""
    bound_malloc_arenas()  # the driver's memory per 1,000 trials (raycls.cli set it first; library callers here)
    storage = absolute(options.storage)
    filesystem(storage)  # fail early, with a clear message, on a storage we cannot reach
    # The metric checked, teacher / init {from: EXP, pick: best} -> checkpoint paths, before any trial starts.
    experiment = prepare_experiment(experiment, storage=storage)
    ray = search_ray(experiment, options.address, num_cpus=options.num_cpus, verbose=options.verbose)
    # Ray Client (ray://) holds its context per thread (RayAPIStub): it connects on the caller's thread.
    client = (options.address or "").startswith("ray://")
    return StartedSearch(experiment, storage, RayStart(background=background and not client, **ray))
