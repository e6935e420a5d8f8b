"""`raycls cluster status`: the connected cluster's hosts, their resources, and which trials run where.

Read from Ray's State API (the dashboard of the head, so run it on the head or through `ray dashboard`):
nodes from `list_nodes`, the processes on each from `list_actors`. Tune's trial actors are `ImplicitFunc`
actors shown by their trainable's name; Ray Train's workers (of multi-worker trials) are `RayTrainWorker`s.
Which trial an actor is comes from the experiment storage, when given: every Tune report (a trial's
`result.json` line) names the process that made it (`pid`, `node_ip`); the last one of each trial is
matched with the alive actors.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray.util.state import list_actors, list_nodes
from ray.util.state.exception import ServerUnavailable

from raycls.errors import RayclsError
from raycls.storage import TUNE_RESULT_FILE, ExperimentPaths, tune_results

# The Ray actor classes that are a trial's processes, by what `raycls cluster status` calls them.
TRIAL_ACTOR = "ImplicitFunc"  # Tune's function trainable (repr: the trainable's name, tune_trainable)
TRAIN_WORKER = "RayTrainWorker"  # one worker of a multi-worker (Ray Train) trial
ROLES = {TRIAL_ACTOR: "trials", TRAIN_WORKER: "train_workers"}


@dataclass
class HostStatus:
    node_id: str
    ip: str
    hostname: str
    head: bool
    alive: bool
    resources: dict[str, float]
    actors: dict[str, int] = field(default_factory=dict)  # alive actors by role (trials, train_workers, other)
    trials: list[str] = field(default_factory=list)  # trial ids whose trial actor runs here (needs the storage)


def cluster_status(storage: str | None = None) -> list[HostStatus]:
    """The hosts of the cluster `ray.init` joined, head first, then by address."""
    try:
        nodes = list_nodes(limit=10_000, raise_on_missing_output=False)
    except ServerUnavailable as err:
        raise RayclsError(
            "Ray's State API did not answer: this Ray runs without its dashboard (a local `raycls tune` of "
            "one-worker trials starts Ray without it; `ray start --head` and `ray up` clusters have it), or "
            f"it is not reachable from here (run on the head or through `ray dashboard`). Ray said: {err}"
        ) from None
    hosts = {
        n.node_id: HostStatus(
            node_id=n.node_id,
            ip=n.node_ip,
            hostname=n.node_name,
            head=bool(n.is_head_node),
            alive=n.state == "ALIVE",
            resources={k: float(v) for k, v in (n.resources_total or {}).items() if not k.startswith("node:")},
        )
        for n in nodes
    }
    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    counts: dict[str, Counter] = {node: Counter() for node in hosts}
    trial_processes: dict[tuple[str, int], str] = {}  # (node ip, pid) -> node id, for the trial actors
    for actor in actors:
        role = ROLES.get(actor.class_name, "other")
        counts.setdefault(actor.node_id, Counter())[role] += 1
        if role == "trials" and actor.node_id in hosts and actor.pid:
            trial_processes[(hosts[actor.node_id].ip, int(actor.pid))] = actor.node_id
    for node, counted in counts.items():
        if node in hosts:
            hosts[node].actors = dict(sorted(counted.items()))
    if storage:
        for trial_id, process in last_reporters(Path(storage)).items():
            if process in trial_processes:
                hosts[trial_processes[process]].trials.append(trial_id)
    for host in hosts.values():
        host.trials.sort()
    return sorted(hosts.values(), key=lambda h: (not h.head, not h.alive, h.ip))


def last_reporters(storage: Path) -> dict[str, tuple[str, int]]:
    """Trial id -> (node ip, pid) of the process that made its last Tune report, for the trials of every
    experiment under `storage` that have no leaderboard row yet (Tune's trial folders:
    `<storage>/<experiment>/<trial folder>/result.json`). Tune reuses a trial actor for the next trial, so a
    process is given to the trial that reported last from it."""
    latest: dict[tuple[str, int], tuple[float, str]] = {}
    for experiment in (p for p in storage.iterdir() if p.is_dir()) if storage.is_dir() else ():
        ended = ExperimentPaths(str(storage), experiment.name).trial_ids()
        for results in experiment.glob(f"*/{TUNE_RESULT_FILE}"):
            reports = tune_results(results.parent)
            last = reports[-1] if reports else None
            if not last or not last.get("node_ip") or not last.get("pid") or last.get("trial_id") in ended:
                continue
            process, when = (str(last["node_ip"]), int(last["pid"])), float(last.get("timestamp") or 0)
            if process not in latest or when >= latest[process][0]:
                latest[process] = (when, str(last["trial_id"]))
    return {trial: process for process, (_, trial) in latest.items()}


def as_json(hosts: list[HostStatus]) -> str:
    return json.dumps([asdict(h) for h in hosts], indent=2, sort_keys=True)
