"""Faults on a multi-node Ray cluster, simulated on this machine (`ray.cluster_utils.Cluster`, 3 nodes).

    head:  2 CPUs, {"on_demand": 1}  (the non-spot node: coordinators of multi-worker trials live here)
    a, b:  2 CPUs, 1 logical GPU each (no CUDA needed: it only drives scheduling)

Each node runs at most 2 one-CPU trials, so concurrent trials must spread. The nodes share one machine, so
the storage is one local folder every node sees: marked shared for the preflight, as a user marks NFS.
Every test here runs searches on a multi-node cluster: the whole module is `slow` (`-m 'not slow'` skips it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from raycls.cluster.resources import ON_DEMAND
from raycls.config import load_experiment
from raycls.results import read_leaderboard
from raycls.storage import tune_results
from raycls.tune.cluster import init_ray
from raycls.tune.driver import TuneOptions, run_tune

from .conftest import (
    assert_resumed_whole,
    kill_driver_when,
    rows_written,
    tune_reports,
    wait_until_released,
    write_yaml,
)

pytestmark = pytest.mark.slow

BASE = """
base:
  data: {name: digits, val_fraction: 0.2, train_subset: 400}
  model: {name: small_cnn, width: 8}
  train: {epochs: 2, batch_size: 64, optimizer: adamw, lr: 3.0e-3, warmup_epochs: 0}
"""
# For tests about scheduling, not about the held-out evaluation (which costs a second or two per trial).
NO_EVAL = BASE.replace("warmup_epochs: 0}", "warmup_epochs: 0}\n  eval: {on: none}")
WORKER_NODE = dict(num_cpus=2, num_gpus=1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(own_ray):
    head = {
        "num_cpus": 2,
        "resources": {ON_DEMAND: 1},
        "dashboard_port": _free_port(),  # beside another Ray on this machine (a parallel test run)
        # Notice a removed node in about a second instead of Ray's default of tens of seconds.
        "_system_config": {
            "health_check_initial_delay_ms": 0,
            "health_check_period_ms": 500,
            "health_check_failure_threshold": 3,
            "prestart_worker_first_driver": False,  # as raycls's own local Ray (init_ray): actors only here
        },
    }
    simulated = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(2):
        simulated.add_node(**WORKER_NODE)
    simulated.wait_for_nodes()
    init_ray(simulated.address)
    yield simulated
    ray.shutdown()
    simulated.shutdown()


def alive_node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def tune(tmp_path: Path, name: str, text: str):
    space = write_yaml(tmp_path / f"{name}.yaml", text)
    storage = str(tmp_path / "results")
    outcome = run_tune(load_experiment(space), TuneOptions(storage=storage, live=False, shared_storage=True))
    return storage, outcome


# Spread: trials spreading over the nodes is test_multihost's (real hosts, `raycls cluster status` beside it),
# and the default concurrency a cluster's nodes give is test_cluster's (`default_concurrency`, pure).


# ------------------------------------------------------------------------------------------- failures
def test_failing_trials_are_failed_with_their_message_and_retries(cluster, tmp_path: Path) -> None:
    """A dataset folder without images raises; lr=1e30 with no clipping makes the loss NaN. With
    max_failures: 1 Tune retries each once: both are failed, with their message, and one restart."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    storage, outcome = tune(
        tmp_path,
        "faulty",
        """
experiment: {name: faulty, trials: 3, concurrency: 3, max_failures: 1}
search:
  points_to_evaluate:
    - {data.name: folder, train.lr: 0.003}
    - {data.name: digits, train.lr: 1.0e+30}
    - {data.name: digits, train.lr: 0.003}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  data.name: {type: choice, values: [digits, folder]}
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
        # An empty folder: data.path exists (a missing one is refused before any trial), so the folder
        # trial fails as it loads its data, on the workers.
        + BASE.replace("train_subset: 400}", f"train_subset: 400, path: {empty}}}"),
    )
    rows = {(r["data.name"], r["train.lr"]): r for r in read_leaderboard(storage, "faulty").table.to_pylist()}
    assert len(rows) == 3 and outcome.errors == 2
    missing, diverged, good = rows[("folder", 0.003)], rows[("digits", 1e30)], rows[("digits", 0.003)]
    assert (
        missing["status"] == "failed" and "no-images" in missing["error"] and "no class subfolders" in missing["error"]
    )
    assert diverged["status"] == "failed" and "diverged" in diverged["error"]
    assert missing["restarts"] == 1 and diverged["restarts"] == 1  # max_failures: 1, each retried once
    assert good["status"] == "completed" and good["restarts"] == 0 and good["error"] is None


# -------------------------------------------------------------------------------------- no leaks
def test_asha_stopped_trials_release_placement_groups_and_gpus(cluster, tmp_path: Path) -> None:
    """~25 s: 30 one-worker trials of half a logical GPU each (4 at a time on the two GPU nodes); ASHA stops
    most at epoch 1 (judged by val_loss: accuracies of barely trained models tie, and ties are not stopped).
    Afterwards no placement group is left and every CPU and GPU is free again."""
    before = {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
    storage, outcome = tune(
        tmp_path,
        "leak",
        """
experiment: {name: leak, metric: val_loss, mode: min, trials: 30, resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0.5}}
search: {seed: 3, n_startup_trials: 30}
scheduler: {name: asha, max_t: 3, grace_period: 1, reduction_factor: 3}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-1}
"""
        + NO_EVAL.replace("epochs: 2", "epochs: 3").replace("train_subset: 400", "train_subset: 200"),
    )
    rows = read_leaderboard(storage, "leak").table.to_pylist()
    stopped = [r for r in rows if r["status"] == "early_stopped"]
    assert len(rows) == 30 and len(stopped) >= 15, [r["status"] for r in rows]
    free = wait_until_released()
    total = ray.cluster_resources()
    assert free.get("GPU") == total["GPU"] == 2 and free.get("CPU") == total["CPU"] == 6
    left = {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
    assert left <= before, f"{len(left - before)} placement groups left behind"


# ------------------------------------------------------------------------------------- driver killed
RESUME = """
experiment: {name: resume, trials: 4, concurrency: 2}
search: {seed: 1}
scheduler: {name: fifo}
wandb: {mode: disabled}
space:
  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
""" + BASE.replace("epochs: 2", "epochs: 3")
TRIALS = 4


def epochs_reported(experiment_dir: Path) -> dict[str, int]:
    """Epochs each trial has reported to Tune so far (its result.json, read by storage's one reader: a line
    still being written does not count yet), by trial folder."""
    return {folder.name: len(tune_results(folder)) for folder in experiment_dir.glob("tune_trainable_*")}


def _rows(experiment_dir: Path) -> int:
    return len(list((experiment_dir / "leaderboard").glob("*.parquet")))


# When to SIGKILL the driver, read off the experiment folder while it runs.
KILL_POINTS = {
    "before_the_first_row": lambda d: _rows(d) == 0 and any(n >= 1 for n in epochs_reported(d).values()),
    "mid_trial": lambda d: _rows(d) >= 1 and sum(epochs_reported(d).values()) >= 3 * _rows(d) + 1,
    "between_trials": lambda d: _rows(d) >= 2,
    # The last trial has started (its Tune folder exists) and not reported its last epoch. It runs alone
    # (CONCURRENCY) so that it cannot end together with the one before it. Waiting for its first report
    # instead left a window of two reports, which a loaded driver handles back to back (seen once: the
    # driver finished before the kill landed).
    "during_the_last_trial": lambda d: (
        _rows(d) == TRIALS - 1
        and len(list(d.glob("tune_trainable_*/params.json"))) == TRIALS
        and sum(epochs_reported(d).values()) < TRIALS * 3
    ),
}
CONCURRENCY = {"during_the_last_trial": 1}  # the others run two trials at a time


def kill_and_resume(cluster, tmp_path: Path, ready, damage=None, *, concurrency: int = 2) -> None:
    """`raycls tune --address` in its own process, SIGKILLed when `ready(experiment_dir)` (the cluster lives
    on); `damage(experiment_dir)` then breaks what a kill can break; `--resume` must finish the experiment."""
    space = write_yaml(tmp_path / "resume.yaml", RESUME.replace("concurrency: 2", f"concurrency: {concurrency}"))
    storage = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "raycls.cli",
        "tune",
        str(space),
        "--storage",
        str(storage),
        "--address",
        cluster.address,
    ]
    env = {**os.environ, "RAYCLS_SHARED_STORAGE": "1"}
    experiment_dir = storage / "resume"
    log = tmp_path / "driver.log"
    running = kill_driver_when(command, env, log, lambda: ready(experiment_dir))
    assert running, (
        f"the driver ended before the kill point: {_rows(experiment_dir)} rows, epochs reported "
        f"{epochs_reported(experiment_dir)}\n{log.read_text(errors='replace')[-3000:]}"
    )
    before = rows_written(experiment_dir / "leaderboard")
    assert len(before) < TRIALS and len(alive_node_ids()) == 3
    if damage is not None:
        damage(experiment_dir)
    # --no-report: these tests are about the trials (test_tune checks the report a resumed search writes).
    resumed = subprocess.run(
        [*command, "--resume", "--no-report"], capture_output=True, text=True, timeout=400, env=env
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not (experiment_dir / "report").exists()
    rows = assert_resumed_whole(storage, "resume", TRIALS, before)
    assert all(r["status"] == "completed" and r["epochs"] == 3 for r in rows), [
        (r["status"], r["epochs"], r["error"]) for r in rows
    ]
    assert wait_until_released().get("CPU") == 6


def cut_tune_snapshot(experiment_dir: Path) -> None:
    """What a kill during Tune's copy of its snapshot to the storage leaves: its files emptied."""
    for pattern in ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"):
        for path in experiment_dir.glob(pattern):
            path.write_bytes(b"")


def cut_every_snapshot(experiment_dir: Path) -> None:
    cut_tune_snapshot(experiment_dir)
    shutil.rmtree(experiment_dir / ".raycls", ignore_errors=True)


# Each kill point once; two of them also lose what a kill can cut. Tune copies its experiment state to the
# storage in place: a kill mid-copy left empty files, and Tune's restore then "restarted" the experiment
# with 1 of 6 trials (seen: 3 rows of 6, exit 0). raycls resumes from the snapshot it kept (`kept_copy`,
# here with a trial running); with none kept, it reruns the trials that have no row (`no_snapshot`).
DRILLS = [
    pytest.param("before_the_first_row", None, id="before_the_first_row"),
    pytest.param("mid_trial", cut_tune_snapshot, id="mid_trial+kept_copy"),
    pytest.param("during_the_last_trial", None, id="during_the_last_trial"),
    pytest.param("between_trials", cut_every_snapshot, id="between_trials+no_snapshot"),
]


@pytest.mark.parametrize(("point", "damage"), DRILLS)
def test_driver_sigkill_then_resume_on_the_cluster(cluster, tmp_path: Path, point: str, damage) -> None:
    """~25-50 s each: the driver is SIGKILLed at `point` (and `damage` done); `--resume` ends every trial with
    exactly one row."""
    kill_and_resume(cluster, tmp_path, KILL_POINTS[point], damage, concurrency=CONCURRENCY.get(point, 2))


# ---------------------------------------------------------------------------------------- node lost
def lose(cluster: Cluster, node) -> None:
    """Every process of a node at once, as a preempted machine: the processes its Ray started (the Train
    workers among them) and Ray's own. `remove_node` kills only Ray's own; the workers noticed that their
    raylet had gone only seconds later and, on a loaded machine, finished the trial first (seen in a suite)."""
    started: list[psutil.Process] = []
    for _, process in node.live_processes():
        try:
            started += psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for child in started:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)


def test_worker_node_removed_mid_trial_resumes_from_checkpoint(cluster, tmp_path: Path) -> None:
    """~40 s: a 2-worker trial (Ray Train); once it has a checkpoint, the node its workers run on is removed.
    Ray Train restarts the worker group on the nodes left, from the last checkpoint, and the trial finishes;
    its leaderboard row counts the restart (Tune's num_failures never sees it)."""
    # Epochs to spare after the first report reaches Tune, where the node is lost: an epoch of this trial can
    # take 0.15 s, a report reaches Tune's result.json epochs late on a loaded machine, and losing a node
    # takes a second or more; with 8 epochs the trial ended first (seen in suites). 40 leave ~5 s or more.
    epochs = 40
    space = write_yaml(
        tmp_path / "lost.yaml",
        """
experiment: {name: lost, trials: 1, max_failures: 1, resources: {workers: 2, cpus_per_worker: 1}}
scheduler: {name: fifo}
wandb: {mode: disabled}
"""
        + BASE.replace("epochs: 2", f"epochs: {epochs}").replace(", train_subset: 400", ""),
    )
    storage = tmp_path / "results"
    removed: dict[str, str] = {}

    def remove_a_worker_node() -> None:
        # Watched through what Tune has seen: reports whose checkpoint Ray Train has registered.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not tune_reports(storage / "lost"):
            time.sleep(0.05)
        # Rank 0's node, from its own report. Not from the placement groups: a worker group's bundles once
        # named another node than the one its rank 0 reported from, and the trial ran on, not restarted.
        hosts = {r.get("node_id") for r in tune_reports(storage / "lost")}
        for node in cluster.worker_nodes:
            if node.node_id in hosts:
                removed["node_id"] = node.node_id
                lose(cluster, node)
                break
        for pg in ray.util.placement_group_table().values():  # the trial's coordinator bundle, and its node
            if pg["state"] == "CREATED" and ON_DEMAND in pg["bundles"][0]:
                removed["coordinator_node"] = pg["bundles_to_node_id"][0]

    # Hold the head's CPUs (only the head has ON_DEMAND, so this bundle lands there): the Train workers must
    # go to worker nodes, one of which can then be removed. Without it Ray may pack both workers on the head.
    hold_head = ray.util.placement_group([{"CPU": WORKER_NODE["num_cpus"], ON_DEMAND: 0.5}])
    ray.get(hold_head.ready(), timeout=60)
    killer = threading.Thread(target=remove_a_worker_node, daemon=True)
    killer.start()
    try:
        run_tune(load_experiment(space), TuneOptions(storage=str(storage), live=False, shared_storage=True))
        killer.join(timeout=10)
        assert "node_id" in removed, "no Ray Train worker found on a worker node"
        # The coordinator asked for a share of `on_demand`: it ran on the head, the one node declaring it.
        assert removed["coordinator_node"] == cluster.head_node.node_id
        (row,) = read_leaderboard(str(storage), "lost").table.to_pylist()
        assert row["status"] == "completed" and row["epochs"] == epochs and row["workers"] == 2
        assert row["restarts"] == 1
        history = read_leaderboard(str(storage), "lost", kind="history").table.to_pylist()
        assert sorted({h["epoch"] for h in history}) == list(range(1, epochs + 1))
        resumed = [h for h in history if h["restarts"] == 1]
        # It went on from its checkpoint (not from epoch 1), on a node that is still there.
        assert resumed and min(h["epoch"] for h in resumed) > 1
        assert all(h["node_id"] != removed["node_id"] for h in resumed)
    finally:
        ray.util.remove_placement_group(hold_head)
        if "node_id" in removed:
            cluster.add_node(**WORKER_NODE)  # give the module its 3 nodes back
            cluster.wait_for_nodes()


def test_multi_worker_trial_that_diverges_is_retried_max_failures_times(cluster, tmp_path: Path) -> None:
    """~45 s: a 2-worker trial whose loss is NaN. Ray Train restarts its worker group once (max_failures: 1);
    Tune's retry of the trial then fails at once instead of starting the worker group twice more."""
    storage, outcome = tune(
        tmp_path,
        "nan2",
        """
experiment: {name: nan2, trials: 1, max_failures: 1, resources: {workers: 2, cpus_per_worker: 1}}
scheduler: {name: fifo}
wandb: {mode: disabled}
"""
        + BASE.replace("lr: 3.0e-3", "lr: 1.0e+30"),
    )
    (row,) = read_leaderboard(storage, "nan2").table.to_pylist()
    assert row["status"] == "failed" and "diverged" in row["error"] and row["restarts"] == 1
    (run,) = (Path(storage) / "nan2" / "train_runs").glob("train-*")
    assert "diverged" in (run / "raycls_failed.txt").read_text()
