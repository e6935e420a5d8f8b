"""Checks for the cluster definitions under cluster/: Ray launcher YAMLs (`ray up`) and KubeRay manifests.

`raycls cluster validate FILE` runs `check_launcher`. A launcher YAML (it has `provider`) is first checked
against Ray's own JSON schema, the one `ray up` applies, so mistakes show before any machine is paid for. A
KubeRay manifest (`kind: RayCluster`) has no schema in the ray package, so the structure raycls relies on is
checked by hand. Then raycls's own rules, each a small function in a registry, each problem naming its key:

- storage: a cluster of more than one node keeps results where every node sees them. The storage is the
  `export RAYCLS_STORAGE=URI` line in `setup_commands` (the default of `raycls tune --storage` on the nodes);
  for KubeRay, the head container's `RAYCLS_STORAGE` env var. It must be s3://, gs://, or a path under an NFS
  mount made in the same file (`mount -t nfs ...` in a command; for KubeRay an `nfs` volume).
- GPUs: node types on GPU hardware declare `resources: {GPU: n}` (aws g4dn/g5/g6/p3/p4d/p5 instances, gcp
  nodes with guestAccelerators; on gcp, n equals the acceleratorCount); KubeRay GPU groups set
  `nvidia.com/gpu` limits.
- dashboard: never bound to 0.0.0.0 (it runs arbitrary jobs); users reach it through `ray dashboard`.
- auth: Ray token authentication (`RAY_AUTH_MODE=token`) on every node.
- secrets: no access keys, tokens or private keys written in the file; `$VAR` / `${VAR}` references and
  files (file_mounts, Kubernetes Secrets) are fine.

Ray itself is not imported: the schema and defaults are read from the installed package's files.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from raycls.errors import ConfigError

Doc = dict[str, Any]
Check = Callable[[Doc], list[str]]

LAUNCHER_CHECKS: list[Check] = []  # files with `provider`, after Ray's schema passed
KUBERAY_CHECKS: list[Check] = []  # `kind: RayCluster` manifests, after the structure check passed


def launcher_rule(check: Check) -> Check:
    LAUNCHER_CHECKS.append(check)
    return check


def kuberay_rule(check: Check) -> Check:
    KUBERAY_CHECKS.append(check)
    return check


# ------------------------------------------------------------------------------------------- entry points
def validate_launcher(path: str | Path) -> list[str]:
    """Every problem of a cluster file, each `dotted.key: what is wrong`; empty when it is fine."""
    path = Path(path)
    doc = _load(path)
    if isinstance(doc, str):
        return [doc]
    if "provider" in doc:
        shape, rules = _schema_problems(doc), LAUNCHER_CHECKS
    elif doc.get("kind") == "RayCluster":
        shape, rules = _kuberay_structure(doc), KUBERAY_CHECKS
    else:
        return [
            f"{path.name} is neither a Ray cluster launcher YAML (no `provider` key) "
            "nor a KubeRay manifest (`kind: RayCluster`)"
        ]
    # The rules read the shapes checked first, so they run only on a well-shaped file; secrets always.
    return (shape or _run(rules, doc)) + _secret_problems(doc, path)


def check_launcher(path: str | Path) -> None:
    """Raise ConfigError listing every problem of a cluster file (for `raycls cluster validate`)."""
    problems = validate_launcher(path)
    if problems:
        raise ConfigError(problems, source=str(path))


def _run(checks: list[Check], doc: Doc) -> list[str]:
    return [problem for check in checks for problem in check(doc)]


def _load(path: Path) -> Doc | str:
    """The parsed file, or the one problem that stops every other check (as a string naming the file)."""
    if not path.is_file():
        return f"{path} does not exist (expected a cluster YAML)"
    try:
        # safe_load: a cluster file must never be able to construct Python objects.
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        return f"{path.name} is not valid YAML{at}: {getattr(err, 'problem', None) or err}"
    if not isinstance(doc, dict):
        return f"{path.name} must be a mapping (a Ray launcher YAML or a KubeRay RayCluster), got {type(doc).__name__}"
    return doc


# ----------------------------------------------------------------------------------------- Ray's schema
def _ray_file(*parts: str) -> Path | None:
    """A data file of the installed ray package, found without importing ray (slow, and a CLI check needs
    no Ray runtime)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent.joinpath(*parts)


@functools.cache
def _ray_schema() -> dict[str, Any] | None:
    path = _ray_file("autoscaler", "ray-schema.json")
    return json.loads(path.read_text()) if path and path.is_file() else None


def _schema_problems(doc: Doc) -> list[str]:
    import jsonschema

    schema = _ray_schema()
    if schema is None:
        return ["Ray's launcher schema (ray/autoscaler/ray-schema.json) was not found: is ray installed?"]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_dotted(error.absolute_path) or '(top level)'}: {_short(error.message)}" for error in errors]


@functools.cache
def _ray_defaults(provider_type: str) -> Doc:
    """What `ray up` fills in for keys a file leaves out (ray/autoscaler/<provider>/defaults.yaml)."""
    path = _ray_file("autoscaler", provider_type, "defaults.yaml")
    return yaml.safe_load(path.read_text()) if path and path.is_file() else {}


# -------------------------------------------------------------------------------------- launcher rules
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
STORAGE_EXPORT = re.compile(r"\bexport\s+RAYCLS_STORAGE=[\"']?([^\s\"';&|]+)")
SHARED_SCHEMES = ("s3://", "gs://", "gcs://")
DASHBOARD_OPEN = re.compile(r"--dashboard-host(?:=|\s+)[\"']?(0\.0\.0\.0|::|\[::\])(?![\w.])")
TOKEN_AUTH = re.compile(r"\bRAY_AUTH_MODE=[\"']?token\b")
RAY_START = re.compile(r"\bray\s+start\b")
# Instance families whose every size has NVIDIA GPUs (g4ad is AMD, left out: Ray cannot use it for CUDA).
AWS_GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")


def _commands(doc: Doc, key: str) -> list[str]:
    """A command list as `ray up` will run it: the file's own, else Ray's default for the provider."""
    commands = doc[key] if key in doc else _ray_defaults(_provider_type(doc)).get(key)
    return [c for c in commands or [] if isinstance(c, str)]


def _provider_type(doc: Doc) -> str:
    return str((doc.get("provider") or {}).get("type", ""))


def _node_types(doc: Doc) -> dict[str, Doc]:
    return doc.get("available_node_types") or {}


def _spans_nodes(doc: Doc) -> bool:
    """Whether the cluster can ever have more than the head (then local paths are not shared)."""
    provider = doc.get("provider") or {}
    if provider.get("type") == "local" and "coordinator_address" not in provider:
        return bool(provider.get("worker_ips"))
    worker_types = [name for name in _node_types(doc) if name != doc.get("head_node_type")]
    # Ray's default max_workers is 2, and without node types it launches its default worker type.
    return doc.get("max_workers", 2) > 0 and (bool(worker_types) or not _node_types(doc))


def _storage(doc: Doc) -> str | None:
    for key in ("setup_commands", "head_setup_commands"):
        for command in _commands(doc, key):
            if match := STORAGE_EXPORT.search(command):
                return match.group(1)
    return None


def _nfs_mounts(doc: Doc) -> list[str]:
    """Mount points of `mount -t nfs|nfs4 SERVER:/export DIR` (or `mount.nfs SERVER:/export DIR`) commands."""
    return [point for key in COMMAND_KEYS for c in _commands(doc, key) for point in _nfs_mount_points(c)]


def _nfs_mount_points(command: str) -> Iterator[str]:
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a command we can read
        return
    for index, token in enumerate(tokens):
        name = PurePosixPath(token).name
        if name not in ("mount", "mount.nfs", "mount.nfs4"):
            continue
        args = _until_separator(tokens[index + 1 :])
        fstype, positional = _mount_args(args)
        if (fstype.startswith("nfs") or name != "mount") and len(positional) >= 2:
            yield positional[-1]


def _until_separator(tokens: list[str]) -> list[str]:
    for index, token in enumerate(tokens):
        if token and all(ch in ";&|()<>" for ch in token):
            return tokens[:index]
    return tokens


def _mount_args(args: list[str]) -> tuple[str, list[str]]:
    """(filesystem type, positional arguments) of a mount command line; -t/-o take a value."""
    fstype, positional, skip = "", [], False
    for index, arg in enumerate(args):
        if skip:
            skip = False
        elif arg in ("-t", "--types", "-o", "--options"):
            skip = True
            if arg in ("-t", "--types") and index + 1 < len(args):
                fstype = args[index + 1]
        elif arg.startswith("-t") and len(arg) > 2:
            fstype = arg[2:]
        elif not arg.startswith("-"):
            positional.append(arg)
    return fstype, positional


def _under(path: str, mount_point: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(mount_point))


@launcher_rule
def storage_is_shared(doc: Doc) -> list[str]:
    if not _spans_nodes(doc):
        return []  # one machine: any local path is shared with itself
    storage = _storage(doc)
    if storage is None:
        return [
            "setup_commands: no `export RAYCLS_STORAGE=URI` line; a cluster of more than one node needs storage "
            "every node shares: s3://BUCKET/..., gs://BUCKET/..., or a path under an NFS mount made in this file"
        ]
    if storage.startswith(SHARED_SCHEMES) or any(_under(storage, point) for point in _nfs_mounts(doc)):
        return []
    return [
        f"setup_commands: RAYCLS_STORAGE={storage} is not shared by the nodes (trials on every node write "
        "there): use s3://, gs://, or a path under an NFS mount made in this file (`mount -t nfs4 SERVER:/x DIR`)"
    ]


def _aws_gpu(node_config: Doc) -> int | None:
    return 0 if AWS_GPU_INSTANCE.match(str(node_config.get("InstanceType", ""))) else None


def _gcp_gpu(node_config: Doc) -> int | None:
    accelerators = [a for a in node_config.get("guestAccelerators") or [] if isinstance(a, dict)]
    counts = [a.get("acceleratorCount", 1) for a in accelerators]
    return sum(c for c in counts if isinstance(c, int)) if accelerators else None


# Per provider, the GPUs a node_config has: None = no GPU hardware, 0 = some (a count we do not tabulate),
# n = exactly n.
GPU_HARDWARE: dict[str, Callable[[Doc], int | None]] = {"aws": _aws_gpu, "gcp": _gcp_gpu}


@launcher_rule
def gpu_nodes_declare_gpus(doc: Doc) -> list[str]:
    """Ray schedules GPU trials by the declared `GPU` resource: a GPU node that does not declare it gets no
    GPU trials (and on gcp the autoscaler never launches it for them), a wrong count over- or under-packs it."""
    hardware = GPU_HARDWARE.get(_provider_type(doc))
    if hardware is None:
        return []  # local: `ray start` detects the GPUs of each machine
    problems = []
    for name, node in _node_types(doc).items():
        expected = hardware(node.get("node_config") or {})
        declared = (node.get("resources") or {}).get("GPU", 0)
        if expected is None or (declared >= 1 and expected in (0, declared)):
            continue
        want = f"GPU: {expected}" if expected else "GPU: n (the instance's GPU count)"
        problems.append(
            f"available_node_types.{name}.resources: a GPU node type declares {{{want}}}, got GPU: {declared}"
        )
    return problems


@launcher_rule
def dashboard_not_public(doc: Doc) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "head_setup_commands", "setup_commands"):
        for index, command in enumerate(_commands(doc, key)):
            if DASHBOARD_OPEN.search(command):
                origin = f"{key}.{index}" if key in doc else f"{key} (left out, so Ray's {_provider_type(doc)} default)"
                problems.append(
                    f"{origin}: --dashboard-host=0.0.0.0 opens the dashboard, which runs arbitrary jobs, to the "
                    "network; use --dashboard-host=127.0.0.1 and reach it with `ray dashboard CLUSTER.yaml`"
                )
    return problems


@launcher_rule
def token_auth_on_every_node(doc: Doc) -> list[str]:
    """Without RAY_AUTH_MODE=token anyone who reaches the head's ports can run code on the cluster."""
    problems = []
    for role in ("head", "worker"):
        start_key = f"{role}_start_ray_commands"
        starts = [c for c in _commands(doc, start_key) if RAY_START.search(c)]
        exported = [c for key in ("setup_commands", f"{role}_setup_commands") for c in _commands(doc, key)]
        if any(TOKEN_AUTH.search(c) for c in exported) or all(TOKEN_AUTH.search(c) for c in starts):
            continue  # also: no `ray start` for this role at all (a head-only cluster's empty worker list)
        problems.append(
            f"{start_key}: Ray starts without token authentication; set RAY_AUTH_MODE=token (in the "
            "`ray start` command or exported in setup_commands) and copy ~/.ray/auth_token with file_mounts"
        )
    return problems


@launcher_rule
def head_node_type_exists(doc: Doc) -> list[str]:
    head, types = doc.get("head_node_type"), _node_types(doc)
    if types and head not in types:
        return [f"head_node_type: {head!r} is not one of available_node_types ({', '.join(types)})"]
    return []


# ------------------------------------------------------------------------------------------- KubeRay
GPU_LIMIT = "nvidia.com/gpu"


def _get(doc: Any, dotted: str) -> Any:
    """doc["a"]["b"][0]... for "a.b.0", or None where any step is missing or of the wrong kind."""
    for part in dotted.split("."):
        if isinstance(doc, dict):
            doc = doc.get(part)
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


def _groups(doc: Doc) -> list[tuple[str, Doc]]:
    """(dotted key, group spec) of the head group and every worker group."""
    workers = _get(doc, "spec.workerGroupSpecs") or []
    return [("spec.headGroupSpec", _get(doc, "spec.headGroupSpec"))] + [
        (f"spec.workerGroupSpecs.{i}", group) for i, group in enumerate(workers)
    ]


def _kuberay_structure(doc: Doc) -> list[str]:
    """The fields KubeRay needs and the rules below read; the other checks run only when these hold."""
    problems = []
    if not str(doc.get("apiVersion", "")).startswith("ray.io/"):
        problems.append(f"apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
    if not isinstance(_get(doc, "spec.headGroupSpec"), dict):
        return problems + ["spec.headGroupSpec: missing (the head pod's spec)"]
    workers = _get(doc, "spec.workerGroupSpecs")
    if workers is not None and not isinstance(workers, list):
        return problems + ["spec.workerGroupSpecs: must be a list of worker groups"]
    for key, group in _groups(doc):
        problems += _group_structure(key, group, head=key == "spec.headGroupSpec")
    return problems


def _group_structure(key: str, group: Any, *, head: bool) -> list[str]:
    if not isinstance(group, dict):
        return [f"{key}: must be a mapping"]
    problems = []
    containers = _get(group, "template.spec.containers")
    if not isinstance(containers, list) or not containers or not all(isinstance(c, dict) for c in containers):
        problems.append(f"{key}.template.spec.containers: missing (a list with the Ray container first)")
    elif not containers[0].get("image"):
        problems.append(f"{key}.template.spec.containers.0.image: missing")
    if not isinstance(group.get("rayStartParams", {}), dict):
        problems.append(f"{key}.rayStartParams: must be a mapping of `ray start` options")
    if not head:
        problems += _replica_problems(key, group)
    return problems


def _replica_problems(key: str, group: Doc) -> list[str]:
    problems = [] if isinstance(group.get("groupName"), str) else [f"{key}.groupName: missing"]
    counts = {name: group.get(name) for name in ("replicas", "minReplicas", "maxReplicas")}
    for name, value in counts.items():
        if value is not None and (not isinstance(value, int) or value < 0):
            problems.append(f"{key}.{name}: must be an integer >= 0, got {value!r}")
    low, high = counts["minReplicas"], counts["maxReplicas"]
    if isinstance(low, int) and isinstance(high, int) and low > high:
        problems.append(f"{key}.minReplicas: {low=} must be <= maxReplicas {high=}")
    return problems


def _ray_container(group: Doc) -> Doc:
    return _get(group, "template.spec.containers.0") or {}


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env") or [] if isinstance(e, dict) and "name" in e}


def _is_gpu_group(group: Doc) -> bool:
    """A group meant for GPUs: named so, asking for them anywhere, or tolerating the GPU nodes' taint."""
    container = _ray_container(group)
    asked = {**(_get(container, "resources.requests") or {}), **(_get(container, "resources.limits") or {})}
    tolerations = _get(group, "template.spec.tolerations") or []
    return (
        "gpu" in str(group.get("groupName", "")).lower()
        or GPU_LIMIT in asked
        or _positive_int((group.get("rayStartParams") or {}).get("num-gpus"))
        or any(isinstance(t, dict) and t.get("key") == GPU_LIMIT for t in tolerations)
    )


@kuberay_rule
def gpu_groups_set_gpu_limits(doc: Doc) -> list[str]:
    """Kubernetes hands out GPUs only through limits, and KubeRay tells Ray the GPU count from them."""
    problems = []
    for key, group in _groups(doc):
        limit = _get(_ray_container(group), "resources.limits") or {}
        if _is_gpu_group(group) and not _positive_int(limit.get(GPU_LIMIT)):
            problems.append(
                f"{key}.template.spec.containers.0.resources.limits: GPU group "
                f"{group.get('groupName', 'head')!r} sets no `{GPU_LIMIT}: n` limit (n >= 1)"
            )
    return problems


def _positive_int(value: Any) -> bool:
    return str(value).isdigit() and int(value) >= 1


@kuberay_rule
def kuberay_dashboard_not_public(doc: Doc) -> list[str]:
    host = _get(doc, "spec.headGroupSpec.rayStartParams.dashboard-host")
    if host is not None and not DASHBOARD_OPEN.search(f"--dashboard-host={host}"):
        return []
    return [
        "spec.headGroupSpec.rayStartParams.dashboard-host: "
        + ("missing, and KubeRay then binds 0.0.0.0" if host is None else f"{host} opens the dashboard")
        + "; the dashboard runs arbitrary jobs: set it to \"127.0.0.1\" and use `kubectl port-forward`"
    ]


@kuberay_rule
def kuberay_storage_is_shared(doc: Doc) -> list[str]:
    if not any(_replicas_max(group) > 0 for _, group in _groups(doc)[1:]):
        return []  # head only
    key = "spec.headGroupSpec.template.spec.containers.0.env.RAYCLS_STORAGE"
    storage = _env(_ray_container(_get(doc, "spec.headGroupSpec"))).get("RAYCLS_STORAGE", {}).get("value")
    if not storage:
        return [f"{key}: missing; worker pods write results too: set s3://..., gs://... or a path on an nfs volume"]
    if str(storage).startswith(SHARED_SCHEMES) or any(_under(storage, p) for p in _nfs_mount_paths(doc)):
        return []
    return [f"{key}: {storage} is not shared by the pods: use s3://, gs:// or a path under an nfs volume's mountPath"]


def _replicas_max(group: Doc) -> int:
    values = [group.get(name) for name in ("replicas", "maxReplicas")]
    return max([v for v in values if isinstance(v, int)], default=0)


def _nfs_mount_paths(doc: Doc) -> list[str]:
    spec = _get(doc, "spec.headGroupSpec.template.spec") or {}
    nfs = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict) and "nfs" in v}
    mounts = _ray_container(_get(doc, "spec.headGroupSpec")).get("volumeMounts") or []
    return [m["mountPath"] for m in mounts if isinstance(m, dict) and m.get("name") in nfs and "mountPath" in m]


@kuberay_rule
def kuberay_token_auth(doc: Doc) -> list[str]:
    if _get(doc, "spec.authOptions.mode") == "token":
        return []  # KubeRay >= 1.5.1 sets RAY_AUTH_MODE and the token on every container itself
    problems = []
    for key, group in _groups(doc):
        if (_env(_ray_container(group)).get("RAY_AUTH_MODE") or {}).get("value") != "token":
            problems.append(
                f"{key}.template.spec.containers.0.env: no RAY_AUTH_MODE=token (with RAY_AUTH_TOKEN from a "
                "Secret), or set spec.authOptions.mode: token"
            )
    return problems


# ------------------------------------------------------------------------------------------- secrets
SECRET_NAMES = ("WANDB_API_KEY", "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# A value is a reference, not a secret, when it is empty or starts with `$` ($VAR, ${VAR}, $(cat FILE)).
_LITERAL = r"[\"']?(?!\$)[^\s\"'$;&|]{4,}"
SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "an AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"),
    "a GCP service-account key": re.compile(r"\"private_key\"\s*:"),
    "an inline secret": re.compile(
        rf"\b(?:{'|'.join(SECRET_NAMES)}|aws_secret_access_key)\b(?:\s*[=:]\s*|\s+){_LITERAL}", re.IGNORECASE
    ),
}
# Comments are prose, so only the patterns that cannot be prose are looked for there.
COMMENT_PATTERNS = ("an AWS access key id", "a private key", "a GCP service-account key")


def _secret_problems(doc: Doc, path: Path) -> list[str]:
    problems = [f"{key}: {what} written in the file; {SECRET_ADVICE}" for key, what in _secrets_in(doc, ())]
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("#"):
            problems += [
                f"line {number} (a comment): {what} written in the file; {SECRET_ADVICE}"
                for what in COMMENT_PATTERNS
                if SECRET_PATTERNS[what].search(line)
            ]
    return problems


SECRET_ADVICE = "take it from an env var ($NAME), a file copied by file_mounts, or a Kubernetes Secret"


def _secrets_in(value: Any, key: tuple[str | int, ...]) -> Iterator[tuple[str, str]]:
    """(dotted key, what) for every secret-looking value: strings, `NAME: value` pairs and k8s env entries."""
    if isinstance(value, str):
        yield from ((_dotted(key), what) for what, pattern in SECRET_PATTERNS.items() if pattern.search(value))
    elif isinstance(value, dict):
        if _is_secret_name(value.get("name")) and _is_literal(value.get("value")):
            yield _dotted((*key, "value")), f"a literal {value['name']}"
        for name, item in value.items():
            if _is_secret_name(name) and _is_literal(item):
                yield _dotted((*key, name)), f"a literal {name}"
            else:
                yield from _secrets_in(item, (*key, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _secrets_in(item, (*key, index))


def _is_secret_name(name: Any) -> bool:
    return isinstance(name, str) and name.upper() in SECRET_NAMES


def _is_literal(value: Any) -> bool:
    return isinstance(value, (str, int)) and str(value).strip() != "" and not str(value).startswith("$")


# ------------------------------------------------------------------------------------------- helpers
def _dotted(path: Any) -> str:
    return ".".join(str(part) for part in path)


def _short(message: str, limit: int = 300) -> str:
    """jsonschema quotes the whole offending value; a node_config can be pages long."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
