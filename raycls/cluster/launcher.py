"""Ray cluster launcher YAMLs (`ray up`): Ray's own JSON schema, then raycls's rules.

- storage: a cluster of more than one node keeps results where every node sees them. The storage is the
  `export RAYCLS_STORAGE=URI` line in `setup_commands` (the default of `raycls tune --storage` on the nodes).
  It must be s3://, gs://, or a path under an NFS mount made in the same file (`mount -t nfs ...`).
- GPUs: node types on GPU hardware declare `resources: {GPU: n}` (aws g4dn/g5/g6/p3/p4d/p5 instances, gcp
  nodes with guestAccelerators; on gcp, n equals the acceleratorCount).
- dashboard: never bound to 0.0.0.0 (it runs arbitrary jobs); users reach it through `ray dashboard`.
- auth: Ray token authentication (`RAY_AUTH_MODE=token`) on every node.

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

from raycls.cluster.doc import Doc, dotted, launcher_rule, short


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


def schema_problems(doc: Doc) -> list[str]:
    import jsonschema

    schema = _ray_schema()
    if schema is None:
        return ["Ray's launcher schema (ray/autoscaler/ray-schema.json) was not found: is ray installed?"]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{dotted(error.absolute_path) or '(top level)'}: {short(error.message)}" for error in errors]


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


def under(path: str, mount_point: str) -> bool:
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
    if storage.startswith(SHARED_SCHEMES) or any(under(storage, point) for point in _nfs_mounts(doc)):
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
