"""Preflight checks against a cluster's nodes (no Ray needed), and once against a real one-node Ray (the
session's: `ray_local`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from raycls.allocator import DRIVER_ARENAS, bound_malloc_arenas
from raycls.cluster.nodes import Node
from raycls.cluster.preflight import default_concurrency, preflight, shared_storage_from_env
from raycls.cluster.resources import ON_DEMAND, local_cpus_needed, trial_bundle
from raycls.config.experiment import Resources
from raycls.errors import RayclsError
from raycls.results.row import count_restarts
from raycls.storage import TRAIN_RUNS_DIR, ExperimentPaths
from raycls.train.ray_train import RESTARTS_FILE, mark_restarts, restarts_of
from raycls.tune.cluster import cluster_nodes
from raycls.tune.trainable import FAILED_FILE

from .conftest import SESSION_RAY


def cpu_node(name: str, cpus: float, gpus: float = 0.0, **custom: float) -> Node:
    return Node(name, {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom})


THREE_CPU_NODES = [cpu_node("head", 3), cpu_node("a", 3), cpu_node("b", 3)]
GPU_NODES = [cpu_node("head", 8, **{ON_DEMAND: 1}), cpu_node("g1", 8, 1), cpu_node("g2", 8, 1), cpu_node("g3", 8, 1)]


# ------------------------------------------------------------------------------------------- storage
def test_local_storage_is_refused_on_several_nodes() -> None:
    with pytest.raises(RayclsError) as caught:
        preflight(Resources(), "/home/me/raycls_results", THREE_CPU_NODES)
    message = str(caught.value)
    assert "/home/me/raycls_results" in message and "3 nodes" in message
    assert "s3://" in message and "RAYCLS_SHARED_STORAGE=1" in message


@pytest.mark.parametrize("storage", ["s3://bucket/results", "gs://bucket/results"])
def test_object_storage_is_accepted_on_several_nodes(storage: str) -> None:
    assert preflight(Resources(), storage, THREE_CPU_NODES).nodes == 3


def test_shared_folder_and_single_node_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert preflight(Resources(), "/mnt/nfs/results", THREE_CPU_NODES, shared_storage=True).nodes == 3
    assert preflight(Resources(), "/home/me/results", THREE_CPU_NODES[:1]).nodes == 1
    with pytest.raises(RayclsError):  # file:// is still this machine's disk
        preflight(Resources(), "file:///home/me/results", THREE_CPU_NODES)
    monkeypatch.setenv("RAYCLS_SHARED_STORAGE", "1")
    assert shared_storage_from_env()
    monkeypatch.setenv("RAYCLS_SHARED_STORAGE", "0")
    assert not shared_storage_from_env()


def test_autoscaler_that_adds_nodes_counts_as_several() -> None:
    head = [cpu_node("head", 4)]
    workers = Node("gpu_workers", {"CPU": 8, "GPU": 1}, alive=False, count=4)
    with pytest.raises(RayclsError, match="autoscaler"):
        preflight(Resources(), "/home/me/results", [*head, workers])
    # ... and its node types may hold workers that no alive node holds yet: not refused.
    plan = preflight(Resources(gpus_per_worker=1), "s3://b/r", [*head, workers])
    assert plan.concurrency == 4


# ----------------------------------------------------------------------------------------- resources
def test_workers_no_node_can_hold_are_refused_naming_keys_and_capacities() -> None:
    with pytest.raises(RayclsError) as caught:
        preflight(Resources(cpus_per_worker=4), "s3://b/r", THREE_CPU_NODES)
    message = str(caught.value)
    assert "CPU=4" in message and "node head (CPU=3)" in message and "node b (CPU=3)" in message
    with pytest.raises(RayclsError) as caught:
        preflight(Resources(gpus_per_worker=1), "s3://b/r", THREE_CPU_NODES)
    assert "GPU=1" in str(caught.value) and "GPU=0" in str(caught.value)
    # 9 CPUs in all, but a 2-CPU worker never spans nodes: 3 such workers fit, not the 4 a trial asks.
    with pytest.raises(RayclsError, match="holds 3 such workers"):
        preflight(Resources(workers=4, cpus_per_worker=2), "s3://b/r", THREE_CPU_NODES)


def test_concurrency_counts_gpus_and_cpus_node_by_node() -> None:
    # Three 1-GPU nodes: one 2-worker 1-GPU trial at a time (its workers sit on two nodes), not 1.5.
    assert default_concurrency(Resources(workers=2, gpus_per_worker=1), GPU_NODES) == 1
    assert default_concurrency(Resources(gpus_per_worker=1), GPU_NODES) == 3
    assert default_concurrency(Resources(gpus_per_worker=0.25), GPU_NODES) == 12
    # CPUs limit GPU trials too: 4 CPUs a worker, 8 per node -> 2 per GPU node even with 0.25 GPU each.
    assert default_concurrency(Resources(cpus_per_worker=4, gpus_per_worker=0.25), GPU_NODES) == 6
    # 2-CPU workers on 3-CPU nodes: one per node.
    assert default_concurrency(Resources(cpus_per_worker=2), THREE_CPU_NODES) == 3
    # Multi-worker CPU trials: one slot is kept for the coordinators' token CPU shares.
    assert default_concurrency(Resources(workers=2), THREE_CPU_NODES) == 4
    assert preflight(Resources(), "s3://b/r", THREE_CPU_NODES, concurrency=2).concurrency == 2


def test_multi_worker_coordinators_are_pinned_to_on_demand_nodes() -> None:
    two = Resources(workers=2, gpus_per_worker=1)
    plan = preflight(two, "s3://b/r", GPU_NODES)
    assert plan.pin_on_demand
    # No CPU: the coordinator fits on a head that keeps its CPUs from tasks (num_cpus: 0).
    assert trial_bundle(two, pin_on_demand=plan.pin_on_demand) == {"cpu": 0.0, "gpu": 0.0, ON_DEMAND: 0.001}
    assert preflight(two, "s3://b/r", [cpu_node("head", 0, **{ON_DEMAND: 1}), *GPU_NODES[1:]]).pin_on_demand
    assert trial_bundle(two) == {"cpu": 0.01, "gpu": 0.0}
    # Without an on_demand node, nothing is pinned; one-worker trials are the workers, never pinned.
    assert not preflight(two, "s3://b/r", GPU_NODES[1:]).pin_on_demand
    one = Resources(gpus_per_worker=1)
    assert not preflight(one, "s3://b/r", GPU_NODES).pin_on_demand
    assert trial_bundle(one) == {"cpu": 1.0, "gpu": 1.0}


def test_a_local_ray_is_sized_for_the_concurrent_trials_and_the_driver(tmp_path: Path) -> None:
    """`raycls tune` (search_ray) and `raycls train` size a local Ray with the same rule."""
    from raycls.config import load_experiment
    from raycls.tune.cluster import search_ray

    assert local_cpus_needed(Resources(workers=2, cpus_per_worker=2), 3) == 13
    assert local_cpus_needed(Resources()) == 2  # `raycls train`: one trial and the driver
    space = tmp_path / "s.yaml"
    space.write_text("experiment: {concurrency: 3, resources: {workers: 2, cpus_per_worker: 2}}\n")
    ray_args = search_ray(load_experiment(space), None)
    assert ray_args["needed_cpus"] == 13 and ray_args["dashboard"] is True


# ---------------------------------------------------------------------------------------- restarts
def test_restart_count_travels_in_the_checkpoint(tmp_path: Path) -> None:
    assert restarts_of(None) == 0
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    assert restarts_of(checkpoint) == 1  # a checkpoint without a count: one restart
    mark_restarts(checkpoint, 2)
    assert (checkpoint / RESTARTS_FILE).is_file() and restarts_of(checkpoint) == 3


def test_leaderboard_restarts_take_the_larger_count() -> None:
    history = [{"epoch": 1, "restarts": 0}, {"epoch": 2, "restarts": 1}, {"epoch": 3, "restarts": 1}]
    assert count_restarts(history, 0, failed=False) == 1  # Ray Train's own restart, unseen by Tune
    assert count_restarts([], 2, failed=True) == 1  # max_failures=1: failed, retried once, failed again
    assert count_restarts([], 1, failed=False) == 1  # failed once, retried, completed
    assert count_restarts([], 0, failed=False) == 0


def test_a_failed_train_run_is_not_restarted_again_by_tune(tmp_path: Path) -> None:
    from raycls.config import load_experiment
    from raycls.config.load import resolve_trial
    from raycls.tune.trainable import _run_torch_trainer

    space = tmp_path / "two.yaml"
    space.write_text(
        "experiment: {name: two, resources: {workers: 2}, max_failures: 1}\nbase: {data: {name: digits}}\n"
    )
    experiment = load_experiment(space)
    run = tmp_path / "two" / TRAIN_RUNS_DIR / "train-x"
    run.mkdir(parents=True)
    (run / FAILED_FILE).write_text("NonFiniteLossError: train_loss is nan at epoch 1: training diverged")
    # Tune's retry of the trial: raises the first failure at once, without starting a worker group.
    with pytest.raises(RuntimeError, match="already failed after its retries.*diverged"):
        _run_torch_trainer(
            resolve_trial(experiment, {}), experiment, ExperimentPaths(str(tmp_path), "two"), name="train-x"
        )


# ----------------------------------------------------------------------------------- a real Ray node
# Slow: the fast tier's one local Ray is test_tune's fast-dev-run search (its run_tune reads cluster_nodes()
# for its preflight); a second worker starting Ray for this test alone cost the fast tier ~10 s.
@pytest.mark.slow
def test_preflight_on_a_local_ray(ray_local, tmp_path: Path) -> None:
    nodes = cluster_nodes()
    (node,) = nodes
    assert node.resources["CPU"] == SESSION_RAY["num_cpus"] and node.resources["GPU"] == SESSION_RAY["num_gpus"] == 1
    plan = preflight(Resources(gpus_per_worker=0.5), str(tmp_path), nodes)
    assert plan.concurrency == 2 and plan.nodes == 1 and not plan.pin_on_demand
    with pytest.raises(RayclsError, match="GPU=2"):
        preflight(Resources(gpus_per_worker=2), str(tmp_path), nodes)


# ------------------------------------------------------------------------------------- the driver's memory
def test_the_driver_bounds_its_malloc_arenas_unless_the_user_did(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert bound_malloc_arenas() is False  # the user's setting stands (glibc read it at start)
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert bound_malloc_arenas() is glibc


# The arenas a `raycls` process has once its command module is loaded (glibc prints one "Arena N:" block per
# arena). Importing pyarrow alone starts a thread with an arena of its own: the cap must come before it.
ARENAS_AFTER_IMPORT = """
import ctypes, raycls.cli, pyarrow.fs
ctypes.CDLL("libc.so.6").malloc_stats()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_the_raycls_command_caps_the_arenas_before_any_thread_allocates() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", ARENAS_AFTER_IMPORT], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    arenas = [line for line in done.stderr.splitlines() if line.startswith("Arena ")]
    assert len(arenas) == DRIVER_ARENAS, done.stderr


# Ray started on a thread of its own (what `raycls tune` does, so Ray comes up while the driver imports):
# Linux sends Ray's processes their parent-death signal when the *thread* that spawned them ends, so a thread
# that returned after `ray.init` left a Ray whose GCS was gone (the next call hung for 60 s, then aborted).
RAY_ON_ITS_OWN_THREAD = """
import signal, time, ray
from raycls.tune.cluster import RayStart
start = RayStart(address=None, needed_cpus=2, num_cpus=2, dashboard=False)
import raycls.tune.driver  # Ray Tune and Optuna load on this thread meanwhile
start.wait()
time.sleep(2)  # Ray's processes outlive the moment its start ended

@ray.remote
def answer():
    return 42

print("answer", ray.get(answer.remote(), timeout=60))
print("sigterm", signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None))
"""


@pytest.mark.slow  # a Ray start of its own (~20 s); the fast tier stays under 3 min on 2 cores
def test_a_ray_started_on_its_own_thread_stays_up_and_exits_on_sigterm_like_ray_init() -> None:
    done = subprocess.run([sys.executable, "-c", RAY_ON_ITS_OWN_THREAD], capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "answer 42" in done.stdout and "sigterm True" in done.stdout, done.stdout
    assert "SIGTERM handler is not set" not in done.stderr  # Ray's warning for a start off the main thread


# Two threads importing at once can deadlock on a circular import. `raycls tune` imports the driver (Ray Tune,
# Optuna), MLflow (through Tune's usage count) and wandb while `ray.init` runs on its own thread: the modules
# both sides need are imported before that thread starts (RayStart.SHARED_IMPORTS), so what each side still
# imports is disjoint. New versions of Ray, MLflow or wandb may change the sets: this test says which.
IMPORTED_BY = """
import importlib, json, sys
import raycls.config, raycls.prepare, raycls.tune.start, ray
from raycls.tune.cluster import RayStart, init_ray
for module in RayStart.SHARED_IMPORTS:
    try:
        importlib.import_module(module)
    except ImportError:
        pass
before = set(sys.modules)
{action}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.slow
def test_the_ray_start_thread_and_the_driver_import_no_module_in_common() -> None:
    def imported(action: str) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-c", IMPORTED_BY.format(action=action)], capture_output=True, text=True, timeout=150
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return set(json.loads(done.stdout.strip().splitlines()[-1]))

    by_ray = imported("init_ray(None, num_cpus=2, dashboard=False)")
    by_driver = imported("import raycls.tune.driver, ray.air.integrations.mlflow, wandb")
    assert by_ray and by_driver
    assert not by_ray & by_driver, f"add to RayStart.SHARED_IMPORTS: {sorted(by_ray & by_driver)}"
