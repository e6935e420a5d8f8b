"""Several Linux hosts on this one machine, for tests of a real multi-host Ray cluster.

Each host is a network namespace with its own address on a bridge (`ip netns`, a veth pair per host), plus
its own PID, mount and UTS namespaces (`unshare --pid --fork --mount-proc --uts`):

    root namespace (the tests, `ray up`)  10.77.N.1  --- bridge rclbr<pid> --+--- head  10.77.N.10
                                                                             +--- w1    10.77.N.11
                                                                             +--- w2    10.77.N.12

- Ray runs on a host as on a real node, `ray start` with its node's address. The host's PID namespace holds
  every process started on it, so `ray stop` (or `ray down`'s) there sees that host's Ray alone, never the
  suite's or anyone else's on the machine; killing the namespace's init (`Host.kill`) takes the whole host down.
- The mount namespace gives each host its own `/tmp/ray` (Ray's sessions, sockets, `ray_current_cluster`,
  the launcher's cluster state), `/etc/hosts` (its hostname resolves to its address: gloo picks the bridge for
  DDP, as on a real node) and home folder (`~/.ray/auth_token`, one token per cluster; `~/.bashrc`, which puts
  this checkout's raycls and the machine's Python first; what `ray up` copies), with the machine's `~/.pyenv`
  mounted in it. Everything else is the machine's: the Python with Ray and raycls, the shared storage folder.
  Each host has a default route via the bridge: Ray finds a node's address by the route out.
- Cutting a host off the network is `Host.link(False)` (its end of the veth pair down).

Needs root and iproute2; `hosts_available()` says why not when it cannot. Teardown kills every host's init
(and with it every process of the host) and deletes the namespaces and links, whatever the tests did.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "rcl"  # namespaces rcl<pid>-<host>, bridge rclbr<pid>: a dead run's leftovers are recognised by the pid

# The init of each host: PID 1 of its PID namespace, reaping orphans (Ray's daemons are re-parented to it).
# It ignores SIGTERM as every PID 1 without a handler does; SIGKILL from outside ends the host.
# The `unshare` process of every host made, by the pid of the run that made it (one file per run).
REGISTRY = Path("/tmp/raycls-netns-hosts")
NODES_MARK = "RAYCLS-NODES "  # the line `Hosts.nodes` reads back from a driver on the head
INIT = (
    "import os, time\nwhile True:\n    try:\n        os.wait()\n    except ChildProcessError:\n        time.sleep(1)\n"
)


def hosts_available() -> str | None:
    """Why network-namespace hosts cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"`{tool}` not found (iproute2 / util-linux)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class Host:
    name: str  # "head", "w1", ...
    ip: str
    netns: str
    veth: str  # the root namespace's end of its link
    root: Path  # its private folders (tmp-ray, home, hosts)
    env: dict[str, str]
    init: subprocess.Popen | None = None  # `unshare`, whose child is the host's PID 1
    logs: list[Path] = field(default_factory=list)

    @property
    def init_pid(self) -> int:
        """The host's PID 1, as the root namespace numbers it."""
        assert self.init is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.init.pid}/task/{self.init.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise RuntimeError(f"host {self.name}: its init did not start")

    def enter(self, command: Sequence[str]) -> list[str]:
        """`command` as run on this host: in its network, mount, PID and UTS namespaces, with its environment."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        return ["nsenter", "-t", str(self.init_pid), "-n", "-m", "-p", "-u", "--", "env", "-i", *env, *command]

    def run(
        self, command: Sequence[str], *, timeout: float = 120, check: bool = True, **kw
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(self.enter(command), capture_output=True, text=True, timeout=timeout, **kw)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"on {self.name}: {' '.join(command)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def popen(self, command: Sequence[str], log: Path, **kw) -> subprocess.Popen:
        """A background process on this host, in its own process group (`os.killpg` ends it and its children
        that stayed in the group), output to `log`."""
        self.logs.append(log)
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.enter(command), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw
            )

    def python(self, code: str, *, timeout: float = 120) -> str:
        return self.run([sys.executable, "-c", code], timeout=timeout).stdout

    def link(self, up: bool) -> None:
        """Plug or unplug this host's network cable (its link to the bridge)."""
        _run("ip", "link", "set", self.veth, "up" if up else "down")

    def kill(self) -> None:
        """Every process of this host, at once (a power cut): SIGKILL to its PID 1 ends the PID namespace."""
        if self.init is None or self.init.poll() is not None:
            return
        try:
            os.kill(self.init_pid, signal.SIGKILL)
        except (ProcessLookupError, RuntimeError):
            pass
        self.init.kill()
        self.init.wait(timeout=30)

    def boot(self) -> None:
        """Start the host's namespaces (again, after `kill`): an empty machine on the same address, with a
        home of its own (`~/.ray`, `~/.bashrc`, what `ray up` copies) in which the machine's Python is
        mounted (`~/.pyenv`, when it lives there)."""
        home = self.root / "home"
        for sub in ("tmp-ray", "home/.ray"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point (the machine's own Rays use it too)
        (self.root / "hosts").write_text(f"127.0.0.1 localhost\n{self.ip} {self.hostname}\n")
        # Login shells on the host (ssh, `ray up`) find this Python, Ray and the raycls under test.
        exports = {k: v for k, v in self.env.items() if k not in ("HOME", "LANG")}
        exports["PATH"] = f"{Path(sys.executable).parent}:{exports.get('PATH', '/usr/bin:/bin')}"
        (home / ".bashrc").write_text("".join(f"export {k}='{v}'\n" for k, v in exports.items()))
        (home / ".profile").write_text(". ~/.bashrc\n")
        mounts = [f"mount --bind {self.root / 'tmp-ray'} /tmp/ray", f"mount --bind {self.root / 'hosts'} /etc/hosts"]
        for inside in (Path.home() / ".pyenv",):  # parts of the machine's home the host's needs
            if inside.is_dir():
                (home / inside.name).mkdir(exist_ok=True)
                mounts.append(f"mount --bind {inside} {home / inside.name}")
        mounts.append(f"mount --rbind {home} {Path.home()}")
        setup = " && ".join([f"hostname {self.hostname}", *mounts, f"exec {sys.executable} -c '{INIT}'"])
        # --kill-child: the host's PID 1 (and so the whole host) dies with this `unshare`.
        unshare = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--uts", "sh", "-c", setup]
        self.init = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *unshare],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.init_pid  # noqa: B018 - waits for it
        with open(REGISTRY / self.netns.removeprefix(PREFIX).split("-")[0], "a") as registry:
            registry.write(f"{self.init.pid}\n")  # for `clean_leftovers`, should this run die without teardown

    def start_sshd(self, host_key: Path, authorized_keys: Path) -> subprocess.Popen:
        """An OpenSSH server on this host's address, for `ray up` (root may log in with the key)."""
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder
        options = {
            "ListenAddress": self.ip,
            "AuthorizedKeysFile": str(authorized_keys),
            "PermitRootLogin": "prohibit-password",
            "StrictModes": "no",
            "UsePAM": "no",
            "PidFile": "none",
        }
        command = ["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-h", str(host_key)]
        command += [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]
        return self.popen(command, self.root / "sshd.log")

    @property
    def hostname(self) -> str:
        return f"rc-{self.name}"


def ray_start(host: Host, command: list[str], attempts: int = 3) -> None:
    """`ray start` on a host, tried again after a failure, as cluster/*.yaml's start commands do: a raylet exits
    when its dashboard agent takes over Ray's hard-coded 15 s to write its port file (ray-project/ray#65983),
    which a 2-core machine running the whole suite reaches. `ray stop` here sees only this host's Ray."""
    for attempt in range(1, attempts + 1):
        done = host.run(command, timeout=180, check=attempt == attempts)
        if done.returncode == 0:
            return
        host.run(["ray", "stop", "--force"], timeout=60, check=False)


@dataclass
class Hosts:
    """N hosts on one bridge; `Hosts.make(...)` sets them up, `close()` takes everything down."""

    tag: str
    subnet: str  # "10.77.N"
    bridge: str
    hosts: list[Host]
    root: Path
    token: str

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def workers(self) -> list[Host]:
        return self.hosts[1:]

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    @classmethod
    def make(cls, root: Path, names: Sequence[str] = ("head", "w1", "w2"), env: dict[str, str] | None = None) -> Hosts:
        clean_leftovers()
        tag = str(os.getpid())
        subnet = f"10.77.{os.getpid() % 200 + 20}"
        bridge = f"{PREFIX}br{tag}"
        token = secrets.token_hex(32)  # the cluster's auth token (Ray's own are 32 random bytes in hex too)
        root.mkdir(parents=True, exist_ok=True)
        base_env = {
            "PYTHONPATH": str(REPO),
            "RAY_AUTH_MODE": "token",
            "HF_HUB_OFFLINE": "1",
            "PATH": os.environ.get("PATH", ""),
            "LANG": "C.UTF-8",
            "HOME": str(Path.home()),
            **(env or {}),
        }
        made = cls(tag, subnet, bridge, [], root, token)
        try:
            _run("ip", "link", "add", bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{subnet}.1/24", "dev", bridge)
            _run("ip", "link", "set", bridge, "up")
            for i, name in enumerate(names):
                host = Host(
                    name,
                    f"{subnet}.{10 + i}",
                    f"{PREFIX}{tag}-{name}",
                    f"{PREFIX}{tag}{name}",
                    root / name,
                    dict(base_env),
                )
                made.hosts.append(host)
                _run("ip", "netns", "add", host.netns)
                _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                _run("ip", "link", "set", host.veth, "master", bridge)
                _run("ip", "link", "set", host.veth, "up")
                for args in (
                    ("addr", "add", f"{host.ip}/24", "dev", "eth0"),
                    ("link", "set", "eth0", "up"),
                    ("link", "set", "lo", "up"),
                    ("route", "add", "default", "via", f"{subnet}.1"),  # Ray finds its address by the route out
                ):
                    _run("ip", "-n", host.netns, *args)
                host.boot()
                (host.root / "home" / ".ray" / "auth_token").write_text(token)
        except BaseException:
            made.close()
            raise
        return made

    # ------------------------------------------------------------------------------------------ Ray
    def start_ray(
        self, *, head_resources: dict[str, float], head_cpus: int, worker_cpus: int, system_config: dict | None = None
    ) -> None:
        """`ray start` on every host: the head on port 6379 with token authentication, the workers joining it."""
        head = [
            "ray", "start", "--head", "--port=6379", f"--node-ip-address={self.head.ip}",
            f"--num-cpus={head_cpus}", "--num-gpus=0", f"--resources={json.dumps(head_resources)}",
            "--dashboard-host=127.0.0.1", "--object-store-memory=100000000", "--disable-usage-stats",
        ]  # fmt: skip
        if system_config:
            head.append(f"--system-config={json.dumps(system_config)}")
        ray_start(self.head, head)
        for worker in self.workers:
            self.start_worker(worker, worker_cpus)

    def start_worker(self, worker: Host, cpus: int) -> None:
        ray_start(
            worker,
            [
                "ray", "start", f"--address={self.head.ip}:6379", f"--node-ip-address={worker.ip}",
                f"--num-cpus={cpus}", "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats",
            ],
        )  # fmt: skip

    @property
    def address(self) -> str:
        return f"{self.head.ip}:6379"

    def nodes(self) -> list[dict]:
        """Ray's nodes as the head sees them (`ray.nodes()`, from a driver on the head)."""
        code = (
            "import json, ray\n"
            f"ray.init(address='{self.address}', logging_level='ERROR', log_to_driver=False)\n"
            f"print({NODES_MARK!r} + json.dumps([{{k: n[k] for k in ('NodeID', 'NodeManagerAddress', 'Alive', 'Resources')}} for n in ray.nodes()]))\n"
        )
        # The marked line, not the last one: Ray's C++ core can write to the driver's stdout after it (seen: a
        # raylet backtrace while `ray up`'s nodes were joining).
        out = self.head.python(code)
        found = next((line[len(NODES_MARK) :] for line in out.splitlines() if line.startswith(NODES_MARK)), None)
        if found is None:
            raise RuntimeError(f"no node list in the head driver's output:\n{out[-3000:]}")
        return json.loads(found)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            alive = [n for n in self.nodes() if n["Alive"]]
            if len(alive) >= count or time.monotonic() > deadline:
                return alive
            time.sleep(1)

    def node_hosts(self) -> dict[str, str]:
        """Node id -> host name, for the alive nodes."""
        by_ip = {h.ip: h.name for h in self.hosts}
        return {n["NodeID"]: by_ip[n["NodeManagerAddress"]] for n in self.nodes() if n["Alive"]}

    # ----------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        for host in self.hosts:
            host.kill()
        for host in self.hosts:
            _run("ip", "link", "del", host.veth, check=False)
            _run("ip", "netns", "del", host.netns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        (REGISTRY / self.tag).unlink(missing_ok=True)

    def memory_mib(self) -> dict[str, float]:
        """Resident memory of each host's processes (MiB, the sum of their RSS)."""
        out = {}
        for host in self.hosts:
            rss = host.run(["sh", "-c", "ps -eo rss= | awk '{s+=$1} END {print s}'"]).stdout.strip()
            out[host.name] = round(int(rss or 0) / 1024, 1)
        return out


def clean_leftovers() -> None:
    """Hosts, namespaces and links of earlier runs whose process is gone (a killed pytest never ran its
    teardown): their hosts' `unshare` processes are killed (and with them everything on those hosts)."""
    REGISTRY.mkdir(exist_ok=True)
    for registry in REGISTRY.iterdir():
        if _alive(registry.name):
            continue
        for pid in registry.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and b"unshare" in cmdline.read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        registry.unlink()
    listed = _run("ip", "netns", "list", check=False).stdout.split()
    for name in listed:
        if name.startswith(PREFIX) and "-" in name and not _alive(name[len(PREFIX) :].split("-")[0]):
            _run("ip", "netns", "del", name, check=False)
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith(PREFIX):
            pid = re.match(r"(?:br)?(\d+)", link[len(PREFIX) :])
            if pid and not _alive(pid.group(1)):
                _run("ip", "link", "del", link, check=False)


def _alive(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def make_hosts(root: Path, **kw) -> Iterator[Hosts]:
    """The fixture's body: hosts up, yielded, and always taken down."""
    hosts = Hosts.make(root, **kw)
    try:
        yield hosts
    finally:
        hosts.close()
