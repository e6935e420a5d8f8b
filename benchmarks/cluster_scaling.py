"""Claim: the same search spreads over more nodes with little scheduling overhead, and the driver does not grow.

The same 24-trial search (digits, small_cnn width 8, 2 fixed epochs, FIFO so every trial does equal work,
1-worker trials of 1 CPU) on a Ray cluster simulated on this machine (`ray.cluster_utils.Cluster`) with
1, 2 and 3 nodes, each node limited to `--per-node` logical CPUs, so a node runs that many trials at a time
and the default concurrency is nodes x per-node. Measured per cluster size:

  wall_s                     `run_tune` alone (the cluster is started before the clock starts)
  trials_per_min             and its ratio to the 1-node run
  overhead_per_trial_s       (wall x concurrency - seconds inside the training loop) / trials, as in
                             trial_overhead.py: what the platform costs per trial slot
  nodes_used                 distinct Ray nodes that reported epochs (trials spread over the nodes)
  driver_rss_growth_mb_per_100_trials   RSS of this (the driver's) process after minus before, x 100 / trials

And the driver over a long search (`--driver-trials 1000`, one node): that many trivial trials (digits, a
width-4 small_cnn, one epoch on a 200-image subset, no evaluation, no W&B), with the live table on. A thread
samples the driver's RSS and the rows written every second:

  driver_mb_per_1000_trials  least-squares slope of RSS against rows written, after the first 100 rows
                             (imports, caches and Ray's warm-up come first); the claim is < 50
  trials_per_min_by_100      throughput in each window of 100 trials (flat: the overhead per trial does
                             not grow with the trials before it)

On a 2-core machine the simulated nodes share the same two cores: more nodes add scheduling slots, not
compute. What this shows is the scheduling overhead of more nodes and more concurrent trials, and that
trials spread; real speed-up needs real nodes.

    python benchmarks/cluster_scaling.py [--trials 24] [--per-node 2] [--nodes 1 2 3] [--driver-trials 1000]
    python benchmarks/cluster_scaling.py --nodes --driver-trials 1000   # the driver run alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported

from raycls.allocator import DRIVER_ARENAS, bound_malloc_arenas  # noqa: E402

bound_malloc_arenas()  # as the `raycls` command does first thing, before any thread allocates

from common import RESULTS, write_result  # noqa: E402

from raycls.config import load_experiment  # noqa: E402
from raycls.results import read_leaderboard  # noqa: E402

SPACE = """
experiment: {{name: {name}, trials: {trials}, resources: {{workers: 1, cpus_per_worker: 1}}}}
search: {{seed: 0}}
scheduler: {{name: fifo}}
wandb: {{mode: disabled}}
base:
  data: {{name: digits, val_fraction: 0.2}}
  model: {{name: small_cnn, width: 8}}
  train: {{epochs: {epochs}, batch_size: 64, optimizer: adamw, lr: 3.0e-3, warmup_epochs: 0}}
space:
  train.lr: {{type: loguniform, low: 1.0e-3, high: 1.0e-2}}
"""


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def run_on_cluster(folder: Path, *, nodes: int, per_node: int, trials: int, epochs: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from raycls.tune.cluster import init_ray
    from raycls.tune.driver import TuneOptions, run_tune

    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node, "dashboard_port": _free_port()})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=per_node)
    cluster.wait_for_nodes()
    init_ray(cluster.address)
    cluster_start_s = time.perf_counter() - started
    try:
        name = f"nodes{nodes}"
        path = folder / f"{name}.yaml"
        path.write_text(SPACE.format(name=name, trials=trials, epochs=epochs))
        storage = str(folder / "results")
        rss_before = rss_mb()
        started = time.perf_counter()
        # One folder every simulated node sees (they share this machine): shared storage, as NFS would be.
        run_tune(load_experiment(path), TuneOptions(storage=storage, live=False, shared_storage=True))
        wall = time.perf_counter() - started
        rss_after = rss_mb()
    finally:
        ray.shutdown()
        cluster.shutdown()
    rows = read_leaderboard(storage, name).table.to_pylist()
    history = read_leaderboard(storage, name, kind="history").table.to_pylist()
    in_loop = sum((h.get("epoch_s") or 0.0) + (h.get("setup_s") or 0.0) for h in history)
    concurrency = nodes * per_node
    per_node_trials: dict[str, int] = {}
    for row in rows:
        first = next(h for h in history if h["trial_id"] == row["trial_id"])
        per_node_trials[first["node_id"]] = per_node_trials.get(first["node_id"], 0) + 1
    return {
        "nodes": nodes,
        "per_node": per_node,
        "concurrency": concurrency,
        "trials": trials,
        "epochs": epochs,
        "cluster_start_s": cluster_start_s,
        "wall_s": wall,
        "trials_per_min": trials / wall * 60,
        "in_loop_s": in_loop,
        "overhead_per_trial_s": (wall * concurrency - in_loop) / trials,
        "epoch_s_median": statistics.median(h["epoch_s"] for h in history),
        "trial_wall_s_median": statistics.median(r["wall_s"] for r in rows),
        "statuses": sorted({r["status"] for r in rows}),
        "completed": sum(r["status"] == "completed" for r in rows),
        "nodes_used": len(per_node_trials),
        "trials_per_node": sorted(per_node_trials.values(), reverse=True),
        "driver_rss_before_mb": rss_before,
        "driver_rss_after_mb": rss_after,
        "driver_rss_growth_mb_per_100_trials": (rss_after - rss_before) * 100 / trials,
    }


TRIVIAL = """
experiment: {{name: {name}, trials: {trials}, concurrency: 2, resources: {{workers: 1, cpus_per_worker: 1}}}}
search: {{seed: 0}}
scheduler: {{name: fifo}}
wandb: {{mode: disabled}}
base:
  data: {{name: digits, val_fraction: 0.2, train_subset: 200}}
  model: {{name: small_cnn, width: 4}}
  train: {{epochs: 1, batch_size: 64, optimizer: adamw, lr: 3.0e-3, warmup_epochs: 0}}
  eval: {{on: none}}
space:
  train.lr: {{type: loguniform, low: 1.0e-3, high: 1.0e-2}}
"""


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)


def driver_flatness(folder: Path, *, trials: int, bounded: bool = True) -> dict:
    """A long search of trivial trials; RSS of this (the driver's) process against rows written. `bounded`:
    ended trials' Tune state trimmed (raycls's default, tune.ledger.EndedTrialTrimmer), else Tune's own."""
    import ray

    from raycls.tune.cluster import init_ray
    from raycls.tune.driver import TuneOptions, run_tune

    name = "driver" if bounded else "driver-unbounded"
    path = folder / f"{name}.yaml"
    path.write_text(TRIVIAL.format(name=name, trials=trials))
    storage = folder / "results"
    board = storage / name / "leaderboard"
    samples: list[tuple[float, int, float]] = []  # (seconds, rows, rss MiB)
    done = threading.Event()

    def sample() -> None:
        started = time.perf_counter()
        while not done.wait(1.0):
            rows = sum(1 for e in os.scandir(board) if e.name.endswith(".parquet")) if board.is_dir() else 0
            samples.append((time.perf_counter() - started, rows, rss_mb()))

    init_ray(None, num_cpus=4)
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        with open(folder / "driver.log", "w") as log, contextlib.redirect_stdout(log):  # the live table's lines
            run_tune(load_experiment(path), TuneOptions(storage=str(storage), live=True, bounded_state=bounded))
    finally:
        done.set()
        sampler.join()
        ray.shutdown()
    wall = time.perf_counter() - started
    rows = read_leaderboard(str(storage), name).table.to_pylist()
    steady = [(r, m) for _, r, m in samples if r >= 100]
    ends = sorted(r["ended_at"] for r in rows)
    per_100 = [100 / max((ends[i + 99] - ends[i]).total_seconds(), 1e-9) * 60 for i in range(0, len(ends) - 99, 100)]
    return {
        "bounded_state": bounded,
        "trials": trials,
        "rows": len(rows),
        "statuses": sorted({r["status"] for r in rows}),
        "wall_s": wall,
        "driver_mb_per_1000_trials": slope([r for r, _ in steady], [m for _, m in steady]) * 1000
        if len(steady) > 2
        else None,
        "driver_rss_mb_at_100_rows": steady[0][1] if steady else None,
        "driver_rss_mb_at_end": samples[-1][2] if samples else None,
        "trials_per_min_by_100": [round(x, 1) for x in per_100],
        "rss_samples": [(round(t, 1), r, round(m, 1)) for t, r, m in samples[:: max(1, len(samples) // 60)]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--per-node", type=int, default=2, help="logical CPUs per node = trials a node runs at once")
    parser.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--driver-trials", type=int, default=1000, help="trivial trials of the driver run (0: none)")
    parser.add_argument(
        "--unbounded", action="store_true", help="also a driver run with Tune's default per-trial state, for the slope"
    )
    args = parser.parse_args()

    runs = []
    previous = (
        json.loads((RESULTS / "cluster_scaling.json").read_text())
        if (RESULTS / "cluster_scaling.json").is_file()
        else {}
    )
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in args.nodes:
            run = run_on_cluster(Path(tmp), nodes=nodes, per_node=args.per_node, trials=args.trials, epochs=args.epochs)
            print(run)
            runs.append(run)
        driver = driver_flatness(Path(tmp), trials=args.driver_trials) if args.driver_trials else previous.get("driver")
        print(driver)
        unbounded = (
            driver_flatness(Path(tmp), trials=args.driver_trials, bounded=False)
            if args.driver_trials and args.unbounded
            else previous.get("driver_unbounded")
        )
        print(unbounded)
    if runs:
        base = next((r for r in runs if r["nodes"] == 1), runs[0])
        for run in runs:
            run["throughput_vs_1_node"] = run["trials_per_min"] / base["trials_per_min"]
    path = write_result(
        "cluster_scaling",
        {
            "claim": "trials spread over every node; scheduling overhead per trial stays flat as nodes are added; "
            "the driver's memory grows less than 50 MB per 1,000 trials",
            "runs": runs or previous.get("runs", []),  # --nodes with no sizes: the node runs of the last full run
            "driver": driver,
            "driver_unbounded": unbounded,
            # The driver's glibc arenas: the user's MALLOC_ARENA_MAX, else what `raycls tune` sets.
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX") or f"{DRIVER_ARENAS} (raycls default)",
            "notes": [
                f"Simulated cluster (ray.cluster_utils.Cluster) on a {os.cpu_count()}-core machine: every node shares "
                "the same cores, so more nodes add scheduling slots, not compute. Throughput cannot rise with nodes "
                "here; the numbers show scheduling overhead and that trials spread, not speed-up.",
                "overhead_per_trial_s = (wall x concurrency - seconds inside the loop) / trials; with more trials at "
                "once on the same cores, each trial's loop is slower too (see epoch_s_median), and that contention "
                "shows up in the loop time, not in the overhead.",
                "The first run's driver RSS growth includes one-time imports and caches (Tune, Optuna, pyarrow); "
                "later runs show the steady state.",
                "Timings are noisy: other processes shared the machine.",
                "driver: what grows is Ray Tune's. tracemalloc over 180 trivial trials: Python heap +20 MB, 15+ MB of "
                "it Trial.run_metadata (for every numeric metric of every trial an analysis dict and two deques) and "
                "Tune's cached per-trial JSON states; Tune's experiment snapshot serialises every trial and runs once "
                "per trial here (raycls forces it when a trial checkpoints, for --resume): 74 ms per snapshot at 400 "
                "trials, the falling trials_per_min_by_100. raycls's own holder, the live table's row per trial, now "
                "keeps the running trials and the best 10.",
                "driver memory and glibc's malloc arenas (raycls.allocator): 300-trial runs in one session: no cap "
                "137 and 158 MB per 1,000 trials; two arenas 58-70; one arena 51 (pyarrow's pool is not the cause: "
                "ARROW_DEFAULT_MEMORY_POOL=system 187). 1,000 trials, 2026-12-03: two arenas 54.5 MB (351 s); "
                "MALLOC_ARENA_MAX=1 46.2 MB (363 s); mallopt(1) set after pyarrow's import had made a second arena "
                "(glibc then reuses both) 56.6 and 55.9; malloc_trim every 50 trials changed nothing (the growth "
                "is live memory, not free pages). With the cap set first thing, as the raycls command does: 47.1 MB "
                "(414 s; a test run shared the cores during the first 100 trials).",
            ],
        },
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
