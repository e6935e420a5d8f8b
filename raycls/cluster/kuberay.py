"""KubeRay manifests (`kind: RayCluster`): the structure raycls relies on (the ray package ships no schema
for them), then raycls's rules: shared storage (the head container's `RAYCLS_STORAGE` env var: s3://, gs://
or under an `nfs` volume), `nvidia.com/gpu` limits on GPU groups, a private dashboard, token auth."""

from __future__ import annotations

from typing import Any

from raycls.cluster.doc import Doc, kuberay_rule
from raycls.cluster.launcher import DASHBOARD_OPEN, SHARED_SCHEMES, under

# ------------------------------------------------------------------------------------------- KubeRay
GPU_LIMIT = "nvidia.com/gpu"


def _get(doc: Any, path: str) -> Any:
    """doc["a"]["b"][0]... for "a.b.0", or None where any step is missing or of the wrong kind."""
    for part in path.split("."):
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


def kuberay_structure(doc: Doc) -> list[str]:
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
        + '; the dashboard runs arbitrary jobs: set it to "127.0.0.1" and use `kubectl port-forward`'
    ]


@kuberay_rule
def kuberay_storage_is_shared(doc: Doc) -> list[str]:
    if not any(_replicas_max(group) > 0 for _, group in _groups(doc)[1:]):
        return []  # head only
    key = "spec.headGroupSpec.template.spec.containers.0.env.RAYCLS_STORAGE"
    storage = _env(_ray_container(_get(doc, "spec.headGroupSpec"))).get("RAYCLS_STORAGE", {}).get("value")
    if not storage:
        return [f"{key}: missing; worker pods write results too: set s3://..., gs://... or a path on an nfs volume"]
    if str(storage).startswith(SHARED_SCHEMES) or any(under(storage, p) for p in _nfs_mount_paths(doc)):
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
