"""Connecting to Ray, and reading the connected cluster's nodes (for `raycls.cluster.preflight`)."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading
from typing import Any

import ray

from raycls.cluster.nodes import Node
from raycls.cluster.resources import local_cpus_needed
from raycls.config.experiment import Experiment


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
            num_cpus=local_num_cpus(needed_cpus, num_cpus),
            num_gpus=num_gpus,
            include_dashboard=dashboard,
            # No idle workers prestarted when the driver connects (Ray starts one per CPU core for tasks):
            # raycls runs actors only (trials, Train workers, Serve replicas), which Ray never places in a
            # prestarted worker, so they were processes that imported Ray beside the first trial and then
            # idled. On 2 cores the quickstart took 24.5 s with them and 23.5 s without (3 runs each).
            _system_config={"prestart_worker_first_driver": False},
            runtime_env={"env_vars": {"RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}},
            **kwargs,
        )
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def local_num_cpus(needed_cpus: float, num_cpus: int | None = None) -> int:
    """The logical CPUs of a local Ray that `init_ray` starts: the user's `num_cpus`, else the machine's cores
    or `needed_cpus`, whichever is more."""
    return num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus))


def search_ray(
    experiment: Experiment, address: str | None, *, num_cpus: int | None = None, verbose: bool = False
) -> dict[str, Any]:
    """`init_ray`'s arguments for a search: enough logical CPUs for its concurrent trials (and the driver),
    and the dashboard only when its trials run Ray Train (one-worker trials train in their trial actor: no
    State API to serve)."""
    resources = experiment.experiment.resources
    return dict(
        address=address,
        needed_cpus=local_cpus_needed(resources, experiment.experiment.concurrency or 1),
        num_cpus=num_cpus,
        verbose=verbose,
        dashboard=resources.workers > 1,
    )


class RayStart:
    """`init_ray` on a thread of its own, so Ray comes up while the caller's thread goes on (`background`;
    else on the caller's thread, before the constructor returns).

    `raycls tune` starts it once every check has passed (raycls.tune.start): Ray's start (4-5 s on 2 cores,
    mostly waiting on the processes it spawns) then overlaps the driver's imports (Ray Tune, Optuna, and what
    Tune's fit would import: several seconds) instead of following them. An error before `wait` still ends
    the command with it; the Ray that came up is shut down at exit by Ray's own atexit hook.

    The thread lives as long as the process: Ray starts its GCS and raylet with a parent-death signal, which
    Linux sends when the *thread* that spawned them ends (a thread that returned after `ray.init` would take
    the local Ray down with it). Two threads importing at once can deadlock on a circular import: the
    modules `ray.init` imports lazily that the driver's imports also need (Ray's usage stats, click,
    OpenTelemetry) are imported here first, so the two threads never import the same module. `ray.init` installs
    its SIGTERM handler (exit, so atexit shuts Ray down) only on the main thread: `wait` installs it there."""

    # What `ray.init` imports lazily that the driver's own imports (Ray Tune, Optuna, MLflow via Tune's usage
    # count, wandb) also import; tests/test_cluster.py checks the two sets share nothing else.
    SHARED_IMPORTS = (
        "ray._common.usage.usage_lib",
        "ray.dashboard",
        "click",
        "netrc",
        "socketserver",
        "opentelemetry.metrics",
        "opentelemetry.trace",
        "opentelemetry.sdk.resources",
        "opentelemetry.sdk.util.instrumentation",
        "opentelemetry.sdk.util._configurator",
        "opentelemetry.semconv._incubating.metrics.otel_metrics",
        "opentelemetry.semconv._incubating.attributes.otel_attributes",
        "opentelemetry.proto",
        "opentelemetry.sdk.environment_variables._internal",
    )

    def __init__(self, *, background: bool = True, **init: Any):
        import atexit
        import importlib

        self._error: BaseException | None = None
        self._up = threading.Event()
        self.in_background = background and not ray.is_initialized()
        if not self.in_background:  # on this thread (or a caller's Ray: a notebook, a test session)
            init_ray(**init)
            self._up.set()
            return
        for module in self.SHARED_IMPORTS:
            try:
                importlib.import_module(module)
            except ImportError:  # another Ray version lays its modules out differently: nothing to share
                pass
        # An exit while Ray is still starting (an error before `wait`) first lets it finish, then Ray's hook stops it
        # (atexit runs the last registered first; Ray registered its hook when it was imported).
        atexit.register(self._up.wait)
        threading.Thread(target=self._run, kwargs=init, name="raycls-ray-start", daemon=True).start()

    def _run(self, **init: Any) -> None:
        quiet = _DropMessage("SIGTERM handler is not set")  # `wait` sets it: Ray's warning would mislead
        logging.getLogger("ray._private.worker").addFilter(quiet)
        try:
            init_ray(**init)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread by `wait`
            self._error = err
        finally:
            logging.getLogger("ray._private.worker").removeFilter(quiet)
            self._up.set()
        if self._error is None:
            threading.Event().wait()  # the parent of Ray's processes until the process ends (see above)

    def wait(self) -> None:
        """Ray is up (or the error that stopped it is raised here)."""
        self._up.wait()
        if self._error is not None:
            raise self._error
        if self.in_background and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init sets there


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


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
