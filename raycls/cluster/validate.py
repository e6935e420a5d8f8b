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

from pathlib import Path

from raycls.cluster.doc import KUBERAY_CHECKS, LAUNCHER_CHECKS, load_doc, run_rules
from raycls.cluster.kuberay import kuberay_structure
from raycls.cluster.launcher import schema_problems
from raycls.cluster.secrets import secret_problems
from raycls.errors import ConfigError


def validate_launcher(path: str | Path) -> list[str]:
    """Every problem of a cluster file, each `dotted.key: what is wrong`; empty when it is fine."""
    path = Path(path)
    doc = load_doc(path)
    if isinstance(doc, str):
        return [doc]
    if "provider" in doc:
        shape, rules = schema_problems(doc), LAUNCHER_CHECKS
    elif doc.get("kind") == "RayCluster":
        shape, rules = kuberay_structure(doc), KUBERAY_CHECKS
    else:
        return [
            f"{path.name} is neither a Ray cluster launcher YAML (no `provider` key) "
            "nor a KubeRay manifest (`kind: RayCluster`)"
        ]
    # The rules read the shapes checked first, so they run only on a well-shaped file; secrets always.
    return (shape or run_rules(rules, doc)) + secret_problems(doc, path)


def check_launcher(path: str | Path) -> None:
    """Raise ConfigError listing every problem of a cluster file (for `raycls cluster validate`)."""
    problems = validate_launcher(path)
    if problems:
        raise ConfigError(problems, source=str(path))
