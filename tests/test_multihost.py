"""raycls on a real multi-host Ray cluster: three hosts on this machine (tests/netns_hosts.py), each its own
network namespace on a bridge, its own PID namespace, and its own Ray started with `ray start`:

    head  10.77.N.10   0 CPUs, {"on_demand": 1}, token authentication; the driver (`raycls tune`) runs here
    w1    10.77.N.11   1 CPU
    w2    10.77.N.12   1 CPU

One CPU per worker host: two one-worker trials run one per host, and a 2-worker trial must span both (its
DDP, gloo, crosses the bridge). The storage is one folder every host sees at the same path (as NFS would be).
The drills cut what a real cluster loses: a host's processes, a host's link, the head's link, the driver.
Each asserts that every trial ends with exactly one leaderboard row and counts its restarts.

Memory (measured, `Hosts.memory_mib`, idle): the head ~1.6 GiB resident (GCS, dashboard and its agents,
raylet), each worker ~0.35 GiB; a training trial adds ~0.4 GiB on its host.

Time (the whole module alone on the 2-core machine): 5 min 46 s (the goal is 8); inside the full suite,
beside the other test process, ~10 min of its process. The ray up test's hosts give up on a lost head after
10 s instead of Ray's 60 (so `ray down`'s worker raylets are gone sooner; the YAML under test is unchanged).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, assert_resumed_whole, kill_driver_when, rows_written, tune_reports, write_yaml
from .netns_hosts import Host, Hosts, hosts_available

pytestmark = pytest.mark.slow

# Ray's node health checks, made faster than its defaults (3 s x 5) but still longer than the head's 5 s of
# flapping (one second down at a time): a dead host is seen in ~5 s, a flapping link is ridden out.
HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 5}

BASE = """
base:
  data: {name: digits, val_fraction: 0.2, train_subset: 400}
  model: {name: small_cnn, width: 8}
  train: {epochs: EPOCHS, batch_size: 64, optimizer: adamw, lr: 3.0e-3, warmup_epochs: 0}
  eval: {on: none}
"""
LR = "space:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}\n"
RECONNECT_TIMEOUT = "RAY_gcs_rpc_server_reconnect_timeout_s"
DRILLS: list[dict] = []  # each drill's rows, restarts and wall time, printed at the end (-s)


# Hosts whose Ray a test took down (`ray up` takes them as fresh machines): the next test starts it again.
TAKEN_DOWN: set[Path] = set()


def start_cluster_ray(hosts: Hosts) -> None:
    hosts.start_ray(head_resources={"on_demand": 1}, head_cpus=0, worker_cpus=1, system_config=HEALTH)
    assert len(hosts.wait_for_nodes(3)) == 3


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    why = hosts_available()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("hosts")
    env = {"RAYCLS_SHARED_STORAGE": "1", "RAYCLS_CACHE": os.environ.get("RAYCLS_CACHE", str(root / "cache"))}
    hosts = Hosts.make(root, env=env)
    try:
        start_cluster_ray(hosts)
        yield hosts
    finally:
        hosts.close()
        for drill in DRILLS:
            print("drill", json.dumps(drill))


@pytest.fixture
def cluster(hosts: Hosts) -> Hosts:
    """The module's hosts with the cluster's Ray on them, whatever ran before (in file order the `ray up`
    test comes last, and nothing pays for this; in any other order the next test does)."""
    if hosts.root in TAKEN_DOWN:
        for host in hosts.hosts:
            host.env.pop(RECONNECT_TIMEOUT, None)
            reboot(host)
        start_cluster_ray(hosts)
        TAKEN_DOWN.discard(hosts.root)
    return hosts


def storage_of(cluster: Hosts) -> Path:
    return cluster.root / "results"


def tune_command(cluster: Hosts, space: Path, *extra: str) -> list[str]:
    """`raycls tune SPACE --address HEAD:6379` as run on the head."""
    command = [sys.executable, "-m", "raycls.cli", "tune", str(space), "--address", cluster.address]
    return cluster.head.enter([*command, "--storage", str(storage_of(cluster)), "--no-report", *extra])


def space_file(cluster: Hosts, name: str, text: str, epochs: int) -> Path:
    return write_yaml(cluster.root / f"{name}.yaml", text + LR + BASE.replace("EPOCHS", str(epochs)))


def run_tune(cluster: Hosts, space: Path, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
    done = subprocess.run(tune_command(cluster, space, *extra), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def cluster_status(cluster: Hosts) -> list[dict]:
    """`raycls cluster status --json`, on the head."""
    command = [sys.executable, "-m", "raycls.cli", "cluster", "status", cluster.address]
    done = cluster.head.run([*command, "--storage", str(storage_of(cluster)), "--json"], timeout=120)
    return json.loads(done.stdout[done.stdout.index("[") :])


def rows(cluster: Hosts, experiment: str) -> list[dict]:
    from raycls.results import read_leaderboard

    return read_leaderboard(str(storage_of(cluster)), experiment).table.to_pylist()


def history(cluster: Hosts, experiment: str) -> list[dict]:
    from raycls.results import read_leaderboard

    return read_leaderboard(str(storage_of(cluster)), experiment, kind="history").table.to_pylist()


def while_running(
    command: list[str], log: Path, during: Callable[[subprocess.Popen], None], timeout: float = 400
) -> int:
    """Run `command`; call `during(process)` in this thread while it runs; return its exit code."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            during(process)
            return process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()


def wait_for(condition: Callable[[], bool], process: subprocess.Popen | None = None, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(0.3)
    return False


def reboot(host: Host) -> None:
    """The host as a fresh machine on the same address: every process gone, its cable plugged in, no Ray."""
    host.kill()
    host.link(True)
    host.boot()


def restore_worker(cluster: Hosts, name: str) -> None:
    """The host back as a fresh machine with Ray joined again (after a drill took it down)."""
    host = cluster[name]
    reboot(host)
    cluster.start_worker(host, 1)
    assert len(cluster.wait_for_nodes(3)) == 3


# ----------------------------------------------------------------------------------- status + spread
def test_hosts_have_their_own_addresses_and_processes(cluster: Hosts) -> None:
    """The hosts are separate: each sees its own address and only its own Ray."""
    for host in cluster.hosts:
        addresses = host.run(["ip", "-o", "-4", "addr", "show", "eth0"]).stdout
        assert f"{host.ip}/24" in addresses
        raylets = host.run(["sh", "-c", "ps -eo comm= | grep -c raylet || true"]).stdout.strip()
        assert raylets == "1", f"{host.name} sees {raylets} raylets"
    nodes = cluster.node_hosts()
    assert sorted(nodes.values()) == ["head", "w1", "w2"]
    memory = cluster.memory_mib()
    assert all(m > 50 for m in memory.values()), memory  # a Ray node's processes, each host's own
    print("host memory (MiB resident, idle):", memory)


def test_trials_spread_over_the_worker_hosts_and_cluster_status_shows_them(cluster: Hosts) -> None:
    """2 one-worker trials at once: one on each worker host (one CPU each), never on the head (no CPUs).
    While they run, `raycls cluster status` shows the hosts, their resources and which trial runs where; the
    rows say which node each trial ran on."""
    space = space_file(
        cluster,
        "spread",
        "experiment: {name: spread, trials: 2, concurrency: 2}\nscheduler: {name: fifo}\nwandb: {mode: disabled}\n",
        # A trial is named from its first report on, and an ask takes seconds (it starts a Ray driver): on a
        # quiet machine 6-epoch trials reported and ended between two asks. 30 epochs last seconds after it.
        30,
    )
    experiment_dir = storage_of(cluster) / "spread"
    seen: list[list[dict]] = []

    def watch(process: subprocess.Popen) -> None:
        # Asked once both trials have reported, and again until it shows a trial on each worker host (a trial
        # may end meanwhile on a loaded machine), or the search ends.
        if wait_for(lambda: len({r.get("trial_id") for r in tune_reports(experiment_dir)}) >= 2, process):
            while process.poll() is None:
                status = cluster_status(cluster)
                seen.append(status)
                if sum(bool(h["trials"]) for h in status) >= 2:
                    return

    code = while_running(tune_command(cluster, space), cluster.root / "spread.log", watch)
    assert code == 0, (cluster.root / "spread.log").read_text()[-3000:]
    node_hosts = cluster.node_hosts()
    found = rows(cluster, "spread")
    assert len(found) == 2 and all(r["status"] == "completed" and r["restarts"] == 0 for r in found)
    assert {node_hosts[r["node_id"]] for r in found} == {"w1", "w2"}
    # The status that caught the most running trials (both, unless a loaded machine let one end between
    # two reads: each read starts a Ray driver): the fixture's hosts, their resources, trials on workers only.
    assert seen, "no status was read while the search ran"
    status = max(seen, key=lambda s: sum(len(h["trials"]) for h in s))
    assert sum(bool(h["trials"]) for h in status) >= 1, seen
    by_host = {h["ip"]: h for h in status}
    assert set(by_host) == {h.ip for h in cluster.hosts} and all(h["alive"] for h in status)
    head, w1, w2 = (by_host[h.ip] for h in cluster.hosts)
    assert head["head"] and head["resources"].get("on_demand") == 1 and not head["resources"].get("CPU")
    assert w1["resources"]["CPU"] == 1 and w2["resources"]["CPU"] == 1
    assert head["trials"] == [] and len(w1["trials"]) <= 1 and len(w2["trials"]) <= 1
    # Each trial named runs in a trial actor there; an actor may be unnamed for a moment (a reused actor between
    # two trials, or one whose trial has not reported yet: a run alone on a quiet machine caught that).
    assert all(w["actors"].get("trials", 0) >= len(w["trials"]) for w in (w1, w2)), status
    assert {*w1["trials"], *w2["trials"]} <= {r["trial_id"] for r in found}


def test_two_worker_ddp_trial_spans_two_hosts(cluster: Hosts) -> None:
    """A 2-worker trial: one Ray Train worker on each worker host (one CPU each), gloo over the bridge; its
    coordinator on the head (`on_demand`)."""
    space = space_file(
        cluster,
        "ddp",
        "experiment: {name: ddp, trials: 1, resources: {workers: 2, cpus_per_worker: 1}}\nscheduler: {name: fifo}\nwandb: {mode: disabled}\n",
        # Long enough for asks that take seconds each to see its workers, and its name once it has reported:
        # an epoch is ~0.5 s; in a loaded suite, 16 epochs ended 10 s after the first report, before an ask.
        30,
    )
    experiment_dir = storage_of(cluster) / "ddp"
    head, w1, w2 = cluster.hosts
    seen: list[dict[str, dict]] = []  # each ask of `raycls cluster status`: host ip -> what it shows

    def ever(host: Host, shows: Callable[[dict], bool]) -> bool:
        return any(shows(snapshot[host.ip]) for snapshot in seen if host.ip in snapshot)

    def one_worker(host: dict) -> bool:
        return host["actors"].get("train_workers") == 1

    def parts_shown() -> dict[str, bool]:
        """A Train worker on each worker host, and the trial on the head (named from its first report)."""
        return {
            "w1 worker": ever(w1, one_worker),
            "w2 worker": ever(w2, one_worker),
            "head trial": ever(head, lambda h: bool(h["trials"])),
        }

    def shown_whole() -> bool:
        return all(parts_shown().values())

    def watch(process: subprocess.Popen) -> None:
        # Asked again and again from the trial's start (its Tune folder) until every part was shown, or the
        # search ends: one ask is a CLI process on the head that takes seconds on a busy machine, so no single
        # ask is required to catch all of it (one that had to, from the first report on, once missed).
        if wait_for(lambda: any(experiment_dir.glob("tune_trainable_*")), process):
            while process.poll() is None and not shown_whole():
                seen.append({h["ip"]: h for h in cluster_status(cluster)})
                # Each ask is a Python process: back to back they would slow the trial they watch. Once both
                # workers were shown, the next ask waits for the trial's first report (its name on the head).
                if ever(w1, one_worker) and ever(w2, one_worker):
                    wait_for(lambda: len(tune_reports(experiment_dir)) >= 1, process)
                else:
                    time.sleep(1)

    code = while_running(tune_command(cluster, space), cluster.root / "ddp.log", watch)
    assert code == 0, (cluster.root / "ddp.log").read_text()[-3000:]
    (row,) = rows(cluster, "ddp")
    assert row["status"] == "completed" and row["workers"] == 2 and row["epochs"] == 30 and row["restarts"] == 0
    assert shown_whole(), f"never shown: {[k for k, v in parts_shown().items() if not v]} in {len(seen)} asks: {seen}"
    assert ever(head, lambda h: h["trials"] == [row["trial_id"]] and h["actors"].get("trials") == 1)  # coordinator
    assert not ever(head, lambda h: h["actors"].get("train_workers", 0) > 0)  # no Train worker on the head
    assert not any(ever(w, lambda h: h["actors"].get("train_workers", 0) > 1) for w in (w1, w2))


# ------------------------------------------------------------------------------------------ drills
def drill_result(name: str, found: list[dict], started: float) -> dict:
    result = {
        "drill": name,
        "rows": len(found),
        "statuses": sorted(r["status"] for r in found),
        "restarts": {r["trial_id"]: r["restarts"] for r in found},
        "wall_s": round(time.monotonic() - started, 1),
    }
    DRILLS.append(result)
    return result


def assert_one_row_each(cluster: Hosts, experiment: str, trials: int, epochs: int) -> list[dict]:
    found = rows(cluster, experiment)
    assert len(found) == trials and len({r["trial_id"] for r in found}) == trials, [r["trial_id"] for r in found]
    assert all(r["status"] == "completed" and r["epochs"] == epochs for r in found), [
        (r["status"], r["epochs"], r["error"]) for r in found
    ]
    by_trial: dict[str, list[int]] = {}
    for h in history(cluster, experiment):
        by_trial.setdefault(h["trial_id"], []).append(h["epoch"])
    # Nothing lost: every epoch of every trial is in its history, once (a restart from a checkpoint goes on
    # after the epoch it saved, and never writes an epoch twice).
    assert all(sorted(e) == list(range(1, epochs + 1)) for e in by_trial.values()), by_trial
    return found


DRILL_SPACE = "experiment: {name: NAME, trials: 2, concurrency: 2, max_failures: 3}\nscheduler: {name: fifo}\nwandb: {mode: disabled}\n"
# A drill's trials outlive the watcher's seconds-late view of their second epoch (at 6 epochs the trial on
# w1 once ended before the link went down, in a loaded suite).
DRILL_EPOCHS = 12


def test_drill_worker_host_killed_mid_trial(cluster: Hosts) -> None:
    """Every process of w1 SIGKILLed once its trial has a checkpoint: the trial goes on from that checkpoint
    on w2 (Tune's retry, `max_failures`), and counts the restart."""
    epochs = DRILL_EPOCHS
    space = space_file(cluster, "killed", DRILL_SPACE.replace("NAME", "killed"), epochs)
    experiment_dir = storage_of(cluster) / "killed"
    w1 = cluster["w1"]
    started = time.monotonic()

    def kill_w1(process: subprocess.Popen) -> None:
        on_w1 = lambda: any(r.get("node_ip") == w1.ip and r.get("epoch", 0) >= 2 for r in tune_reports(experiment_dir))  # noqa: E731
        assert wait_for(on_w1, process), "no trial reported 2 epochs on w1"
        w1.kill()

    try:
        code = while_running(tune_command(cluster, space), cluster.root / "killed.log", kill_w1)
        assert code == 0, (cluster.root / "killed.log").read_text()[-3000:]
        found = assert_one_row_each(cluster, "killed", 2, epochs)
        drill_result("worker host killed", found, started)
        w1_ids = {r["trial_id"] for r in tune_reports(experiment_dir) if r.get("node_ip") == w1.ip}
        (moved,) = [r for r in found if r["trial_id"] in w1_ids]
        assert moved["restarts"] >= 1
        assert moved["node_id"] in {n for n, h in cluster.node_hosts().items() if h == "w2"}
    finally:
        restore_worker(cluster, "w1")


def test_drill_worker_host_link_down_30s(cluster: Hosts) -> None:
    """w1's link down for 30 s once its trial has a checkpoint, then up: Ray declares w1 dead, its trial
    goes on on w2; w1's Ray, told it is dead when the link is back, is started again (the host rejoins);
    every trial has one row."""
    epochs = DRILL_EPOCHS
    space = space_file(cluster, "cut", DRILL_SPACE.replace("NAME", "cut"), epochs)
    experiment_dir = storage_of(cluster) / "cut"
    w1 = cluster["w1"]
    started = time.monotonic()

    def cut_w1(process: subprocess.Popen) -> None:
        on_w1 = lambda: any(r.get("node_ip") == w1.ip and r.get("epoch", 0) >= 2 for r in tune_reports(experiment_dir))  # noqa: E731
        assert wait_for(on_w1, process), "no trial reported 2 epochs on w1"
        w1.link(False)
        time.sleep(30)
        w1.link(True)

    try:
        code = while_running(tune_command(cluster, space), cluster.root / "cut.log", cut_w1)
        assert code == 0, (cluster.root / "cut.log").read_text()[-3000:]
        found = assert_one_row_each(cluster, "cut", 2, epochs)
        drill_result("worker link down 30 s", found, started)
        assert sum(r["restarts"] for r in found) >= 1
    finally:
        w1.link(True)
        restore_worker(cluster, "w1")


def test_drill_head_link_flapping_5s(cluster: Hosts) -> None:
    """The head's link down and up every second for 5 s while both trials report: Ray rides it out (its
    health checks allow 5 s), the search finishes, every trial has one row."""
    epochs = DRILL_EPOCHS
    space = space_file(cluster, "flap", DRILL_SPACE.replace("NAME", "flap"), epochs)
    experiment_dir = storage_of(cluster) / "flap"
    started = time.monotonic()

    def flap(process: subprocess.Popen) -> None:
        both = lambda: len({r["trial_id"] for r in tune_reports(experiment_dir) if r.get("epoch", 0) >= 1}) >= 2  # noqa: E731
        assert wait_for(both, process), "the two trials never reported"
        end = time.monotonic() + 5
        while time.monotonic() < end:
            cluster.head.link(False)
            time.sleep(1)
            cluster.head.link(True)
            time.sleep(1)

    try:
        code = while_running(tune_command(cluster, space), cluster.root / "flap.log", flap)
        assert code == 0, (cluster.root / "flap.log").read_text()[-3000:]
        found = assert_one_row_each(cluster, "flap", 2, epochs)
        drill_result("head link flapping 5 s", found, started)
    finally:
        cluster.head.link(True)
    assert len(cluster.wait_for_nodes(3)) == 3


def test_drill_driver_killed_then_resume(cluster: Hosts) -> None:
    """The driver (on the head) SIGKILLed mid-search; `raycls tune --resume` against the same cluster ends
    every trial with exactly one row, the rows written before the kill untouched."""
    trials, epochs = 4, 3
    space = space_file(
        cluster,
        "resume",
        "experiment: {name: resume, trials: 4, concurrency: 2}\nsearch: {seed: 1}\nscheduler: {name: fifo}\nwandb: {mode: disabled}\n",
        epochs,
    )
    experiment_dir = storage_of(cluster) / "resume"
    board = experiment_dir / "leaderboard"
    started = time.monotonic()
    log = cluster.root / "resume.log"

    def ready() -> bool:  # mid-trial: a row written, and a trial that has not ended has reported
        done = len(list(board.glob("*.parquet")))
        return done >= 1 and len(tune_reports(experiment_dir)) >= epochs * done + 1

    assert kill_driver_when(tune_command(cluster, space), {**os.environ}, log, ready), log.read_text()[-3000:]
    before = rows_written(board)
    assert len(before) < trials
    run_tune(cluster, space, "--resume")
    found = assert_resumed_whole(storage_of(cluster), "resume", trials, before)
    assert all(r["status"] == "completed" and r["epochs"] == epochs for r in found)
    drill_result("driver killed, --resume", found, started)
    # The cluster outlived its driver: the three hosts are still there.
    assert len(cluster.wait_for_nodes(3)) == 3


# ------------------------------------------------------------------------------------------- ray up
def ssh_tools() -> str | None:
    """Why `ray up` cannot run here (no sshd / rsync and no way to install them), or None. Installs Debian's
    openssh-server and rsync when apt-get can (root), as the report tests install Chromium."""
    missing = [tool for tool in ("/usr/sbin/sshd", "rsync", "ssh", "ssh-keygen") if not shutil.which(tool)]
    if missing and shutil.which("apt-get") and os.geteuid() == 0:
        from tests.conftest import machine_lock

        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with machine_lock("apt"):  # the other test process may be installing Chromium (dpkg's lock)
            for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "openssh-server", "rsync"]):
                subprocess.run(step, capture_output=True, timeout=600, env=env)
        missing = [tool for tool in ("/usr/sbin/sshd", "rsync", "ssh", "ssh-keygen") if not shutil.which(tool)]
    return f"needs {', '.join(missing)} (openssh-server, rsync) and apt-get could not install them" if missing else None


def launcher_name(cluster: Hosts) -> str:
    """The `cluster_name` of the test's `ray up` YAML."""
    return f"raycls-test-{cluster.tag}"


def onprem_yaml(cluster: Hosts, key: Path, storage: Path) -> Path:
    """cluster/onprem.yaml with the hosts filled in: their addresses, root with the test's key, and the
    storage a folder every host sees at the same path instead of the NFS share; the raycls install line
    goes (the hosts have the machine's Python, and their ~/.bashrc puts this checkout first)."""
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    config["cluster_name"] = launcher_name(cluster)
    config["provider"].update(head_ip=cluster.head.ip, worker_ips=[w.ip for w in cluster.workers])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    setup = [c for c in config["setup_commands"] if "mount" not in c and "pip install" not in c]
    config["setup_commands"] = [c.replace("/mnt/raycls/results", str(storage)) for c in setup]
    assert any(str(storage) in c for c in config["setup_commands"]), "onprem.yaml's RAYCLS_STORAGE line moved"
    return write_yaml(cluster.root / "onprem.yaml", yaml.safe_dump(config, sort_keys=False))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ray_up_job_submit_ray_down(hosts: Hosts) -> None:
    """The README's on-prem commands, for real: `ray up cluster/onprem.yaml` over ssh into the hosts (fresh
    machines: every Ray of the fixture stopped), `ray dashboard` + `ray job submit` of a search, its rows
    read back, `ray down`. Run from this machine's own namespace (the laptop)."""
    why = ssh_tools()
    if why:
        pytest.skip(why)
    cluster = hosts
    TAKEN_DOWN.add(cluster.root)
    for host in cluster.hosts:  # fresh machines, no Ray
        # `ray down` stops the head only; a worker's raylet exits once it has lost the head for Ray's GCS
        # reconnect timeout (60 s). Hosts that give up after 10 s make the test's wait for it shorter; the
        # YAML under test is unchanged.
        host.env[RECONNECT_TIMEOUT] = "10"
        reboot(host)
    keys = cluster.root / "ssh"
    keys.mkdir(exist_ok=True)
    for name in ("id_ed25519", "host_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    for host in cluster.hosts:
        host.start_sshd(keys / "host_ed25519", keys / "id_ed25519.pub")
    storage = cluster.root / "results-ray-up"
    storage.mkdir()
    launcher = onprem_yaml(cluster, keys / "id_ed25519", storage)
    # Autoscaler v1: with v2 (`ray up`'s default since Ray 2.50) the local provider's head finds its own
    # instance "no longer found" and started one of the two workers here (seen with Ray 2.60).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_UP_enable_autoscaler_v2": "0"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    started = time.monotonic()
    try:
        up = subprocess.run(
            [ray_bin, "up", "-y", "--no-config-cache", str(launcher)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        alive = cluster.wait_for_nodes(3, timeout=300)
        assert sorted(n["NodeManagerAddress"] for n in alive) == sorted(h.ip for h in cluster.hosts)
        port = free_port()
        with open(cluster.root / "ray-dashboard.log", "wb") as log:
            tunnel = subprocess.Popen(
                [ray_bin, "dashboard", "-p", str(port), str(launcher)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            space = space_file(
                cluster,
                "rayup",
                "experiment: {name: rayup, trials: 2, concurrency: 2}\nscheduler: {name: fifo}\nwandb: {mode: disabled}\n",
                3,
            )
            assert wait_for(lambda: _listening(port), tunnel, timeout=60), (
                cluster.root / "ray-dashboard.log"
            ).read_text()
            submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", str(REPO)]
            submit += [
                "--",
                "raycls",
                "tune",
                str(space),
                "--address",
                "auto",
                "--storage",
                str(storage),
                "--no-report",
            ]
            job = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=env)
            assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
        finally:
            os.killpg(tunnel.pid, 9)
            tunnel.wait()
        from raycls.results import read_leaderboard

        found = read_leaderboard(str(storage), "rayup").table.to_pylist()
        assert len(found) == 2 and all(r["status"] == "completed" and r["epochs"] == 3 for r in found)
        DRILLS.append(
            {"drill": "ray up + job submit", "rows": len(found), "wall_s": round(time.monotonic() - started, 1)}
        )
    finally:
        down = subprocess.run(
            [ray_bin, "down", "-y", str(launcher)], capture_output=True, text=True, timeout=300, env=env
        )
    # The local provider keeps its cluster's state beside Ray's temp folder on the launching machine (this
    # one), and `ray down` leaves it: gone with the test's cluster.
    from ray.autoscaler._private.local.config import get_lock_path, get_state_path

    for leftover in (get_lock_path(launcher_name(cluster)), get_state_path(launcher_name(cluster))):
        Path(leftover).unlink(missing_ok=True)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    # `ray down` runs `ray stop` on the head only (each host's `ray stop` sees only its own Ray); the local
    # provider's workers are merely marked terminated, and their raylets exit once the head has been gone for
    # Ray's GCS reconnect timeout (60 s by default; 10 s on these hosts).
    down_at = time.monotonic()

    def raylets() -> dict[str, str]:
        return {
            h.name: h.run(["sh", "-c", "ps -eo comm= | grep -c raylet || true"]).stdout.strip() for h in cluster.hosts
        }

    assert raylets()["head"] == "0"
    assert wait_for(lambda: set(raylets().values()) == {"0"}, timeout=180), raylets()
    DRILLS.append({"drill": "ray down: last worker raylet gone after", "wall_s": round(time.monotonic() - down_at, 1)})


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
