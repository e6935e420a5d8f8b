"""Shared fixtures. Real data comes from ../shared/data (see its README) or $RAYCLS_TEST_DATA."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Bytecode on, for this process and every one it starts (Ray workers, CLI subprocesses), before raycls is
# imported: an image with PYTHONDONTWRITEBYTECODE=1 (this machine's) makes each such process compile the raycls
# modules it imports from source again (the CLI and a trial's modules: 8.0 s against 6.2 s from .pyc) and each
# xdist worker rewrite every test file again. The .pyc files go to the checkout's git-ignored __pycache__.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

import torch  # noqa: E402

from raycls import names  # noqa: E402
from raycls.storage import tune_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYCLS_TEST_DATA", REPO.parent / "shared" / "data"))

# Explicit, and before anything imports Ray (it reads the mode at import): token authentication is Ray's
# default for new local clusters from 2.59 on, and what raycls users get.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Offline machines: make hub lookups fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist's workers get COLUMNS=80 (the controller's terminal): the CLI's piped output is as wide as a
# log's (200), which the tests of one-line tables and messages read.
os.environ["COLUMNS"] = "200"
# A core per pytest-xdist worker: with more torch threads than cores left to them, OpenMP's spinning threads
# wait on each other (the digits model trained 14x slower beside the other worker with 2 threads each).
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


# The modules that take minutes (clusters, kill/resume, whole searches), longest first. pytest-xdist's
# `--dist loadfile` hands a process the next whole module when it is nearly idle, by default the modules with
# the most tests first: these few-test, long modules then came last, and one process ran the last of them
# while the other sat idle (in a simulation of three full runs' timings: 30-45 s of a 15-min run; longest
# first: 0-30 s). The order is kept by switching xdist's reordering off (pytest_configure below).
LONGEST_MODULES = ["test_multihost", "test_faults", "test_tune", "test_i29_sched", "test_seed_spaces", "test_stream"]


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist is installed (the dev extras)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first, each whole and in its own order; every other module after them, in
    decreasing number of tests (xdist's own order)."""
    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.path.stem, []).append(item)

    def rank(module: str) -> tuple[int, int]:
        first = LONGEST_MODULES.index(module) if module in LONGEST_MODULES else len(LONGEST_MODULES)
        return first, -len(by_module[module])

    items[:] = [item for module in sorted(by_module, key=rank) for item in by_module[module]]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set RAYCLS_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Decompressed dataset caches go to a per-session folder unless the user set one (CIFAR-10: ~10 s once).
    os.environ.setdefault("RAYCLS_CACHE", str(Path.home() / ".cache" / "raycls" / "cache"))


# The session's local Ray: 8 logical CPUs (trial actors and Train workers each hold one while mostly waiting
# on each other), and one logical GPU (no CUDA needed) so that fractional-GPU trials can be scheduled.
SESSION_RAY = {"num_cpus": 8, "num_gpus": 1}


@pytest.fixture(scope="session")
def _session_ray() -> Iterator[dict[str, str]]:
    """The address of the Ray `ray_local` started (starting one costs seconds on 2 cores: once a session);
    stopped when the session ends."""
    started: dict[str, str] = {}
    yield started
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_session_ray: dict[str, str]) -> None:
    """One local Ray for every test that needs one, started through `init_ray` (its dashboard stays on:
    Ray Train frees stopped trials' resources through the State API). Module-scoped, so module fixtures (a
    whole search shared by a file's tests) can use it; no module mixes it with `own_ray`. Checked at each module: a test that
    needed a Ray of its own (`own_ray`) stopped it, and a Ray left by anything else would hold other
    resources than the tests count on, so either way the session's one is started again."""
    import ray

    from raycls.tune.cluster import init_ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _session_ray.get("address"):
        ray.shutdown()
    if not ray.is_initialized():
        init_ray(None, **SESSION_RAY)
        _session_ray["address"] = ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def own_ray() -> Iterator[None]:
    """For tests that start or join a Ray of their own in this process (a `Cluster`, Ray Serve): the
    session's Ray is stopped first (`init_ray` keeps a running Ray rather than start another), and theirs
    after the module; `ray_local` starts the session's again when next needed."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def wait_until_released(timeout: float = 60.0) -> dict[str, float]:
    """The connected Ray's available resources once every CPU and GPU is back (or the timeout passes)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        if all(free.get(k, 0.0) >= total.get(k, 0.0) - 1e-6 for k in ("CPU", "GPU")) or time.monotonic() > deadline:
            return free
        time.sleep(0.5)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def kill_driver_when(
    command: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool], *, timeout: float = 240
) -> bool:
    """Run a `raycls tune` command in its own process group and SIGKILL the group once `ready()` holds (or it
    exits, or `timeout` s pass). Its stderr goes to `log` (a pipe nobody reads could fill and stall it).
    Returns whether the driver was still running when killed."""
    with open(log, "wb") as stderr:
        driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready() and driver.poll() is None:
            time.sleep(0.1)
        running = driver.poll() is None
        # The driver's group: the driver, and a local Ray it started; a cluster's nodes live on in theirs.
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:  # the driver ended by itself and left nothing behind: the caller says why
            pass
        driver.wait()
    return running


def rows_written(board: Path) -> dict[str, int]:
    """The leaderboard files in `board`, with their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in board.glob("*.parquet")}


def tune_reports(experiment_dir: Path) -> list[dict]:
    """Every report Tune has written so far, of every trial (trial_id, node_ip, node_id, pid, epoch, ...)."""
    return [report for folder in experiment_dir.glob("tune_trainable_*") for report in tune_results(folder)]


def kill_driver_after_rows(
    command: list[str], env: dict[str, str], board: Path, log: Path, *, rows: int = 2
) -> dict[str, int]:
    """`kill_driver_when` `rows` leaderboard files exist; returns the rows written by then."""
    kill_driver_when(command, env, log, lambda: len(list(board.glob("*.parquet"))) >= rows)
    return rows_written(board)


def assert_resumed_whole(storage: Path, experiment: str, trials: int, before: dict[str, int]) -> list[dict]:
    """The promise of `--resume`: every one of the `trials` trials has exactly one row; rows written before
    the kill are untouched; every Optuna trial has its row's state (COMPLETE / PRUNED / FAIL), except those
    Tune lost with the driver (asked, never run to a row): FAIL and marked `raycls_lost`. None is RUNNING."""
    import optuna

    from raycls.results import read_leaderboard
    from raycls.storage import journal_file
    from raycls.tune.resume import LOST_ATTR, ROW_STATES, TRIAL_ID_ATTR
    from raycls.tune.searcher import open_study_storage

    rows = read_leaderboard(str(storage), experiment).table.to_pylist()
    assert len(rows) == trials and len({r["trial_id"] for r in rows}) == trials, [r["trial_id"] for r in rows]
    after = rows_written(storage / experiment / "leaderboard")
    assert all(after[name] == mtime for name, mtime in before.items())  # finished trials were not rewritten
    study = optuna.load_study(study_name=experiment, storage=open_study_storage(journal_file(storage / experiment)))
    by_id = {t.user_attrs.get(TRIAL_ID_ATTR): t for t in study.trials}
    for row in rows:
        assert by_id[row["trial_id"]].state == ROW_STATES[row["status"]], row["trial_id"]
    others = [t for t in study.trials if t.user_attrs.get(TRIAL_ID_ATTR) not in {r["trial_id"] for r in rows}]
    assert all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get(LOST_ATTR) for t in others)
    return rows


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_chromium() -> str | None:
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """One holder at a time on this machine (pytest-xdist runs the suite in several processes): apt-get
    installs, for one, fail at once when another holds dpkg's lock."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / f"raycls-tests-{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def apt_install(package: str, found: Callable[[], str | None]) -> str | None:
    """`found()`, else Debian's `package` installed here when apt-get can (root), then `found()` again;
    None when there is none to be had."""
    if (path := found()) or not shutil.which("apt-get") or os.geteuid() != 0:
        return path
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with machine_lock("apt"):
        for step in (
            ["apt-get", "install", "-y", "-q", package],
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", package],
        ):
            if path := found():  # another process installed it while this one waited
                return path
            try:
                subprocess.run(step, capture_output=True, timeout=600, env=env)
            except subprocess.TimeoutExpired:
                return None
        return found()


@pytest.fixture(scope="session")
def chromium() -> str | None:
    """A Chromium for the report's PNGs (kaleido) and its headless rendering test: the machine's own, else
    Debian's `chromium` package installed here when apt-get can (root); None when there is none to be had."""
    return apt_install("chromium", _find_chromium)


class Recorder:
    """A report function that keeps every epoch's metrics and a copy of every checkpoint (chain tests)."""

    def __init__(self, folder: Path):
        self.folder, self.metrics, self.checkpoints = folder, [], []

    def __call__(self, metrics: dict, checkpoint: Path | None) -> None:
        self.metrics.append(dict(metrics))
        copy = self.folder / f"epoch{metrics[names.EPOCH]}"
        shutil.copytree(checkpoint, copy)
        self.checkpoints.append(copy)


# ------------------------------------------------------------------------------- a trained digits trial
@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory):
    """A digits small_cnn trained once per session (~5 s on a quiet 2-core CPU): export, predict and serve
    tests each write their own leaderboard row pointing at its checkpoint (`write_digits_row`)."""
    from raycls.config import TrialConfig
    from raycls.train.local import run_local

    root = tmp_path_factory.mktemp("digits-run")
    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits"},
            "model": {"name": "small_cnn", "width": 16},
            "train": {"epochs": 8, "batch_size": 64, "optimizer": "adamw", "lr": 5e-3, "warmup_epochs": 0},
            "eval": {"on": "none"},
        }
    )
    return config, run_local(config, root / "run"), root / "run"


def write_digits_row(digits_run, storage: Path, experiment: str) -> tuple[str, str]:
    """The trained digits trial as experiment `experiment`'s one completed row under `storage`."""
    from raycls.results.leaderboard import TrialRecord, write_trial

    config, summary, run = digits_run
    record = TrialRecord(
        experiment=experiment,
        trial_id="t0001",
        status="completed",
        metric="val_acc",
        mode="max",
        params={},
        param_types={},
        history=[summary.at_best],
        config_json=config.to_json(),
        checkpoint=str(run / "checkpoints" / "best"),
        seed=config.seed,
    )
    write_trial(str(storage), record)
    return str(storage), "t0001"
