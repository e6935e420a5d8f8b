"""A cluster file as a document: loading it, naming its keys, and the registries its rules join.

Each rule is a small function `Doc -> list[str]` (every problem as `dotted.key: what is wrong`), registered
with `launcher_rule` (Ray cluster launcher YAMLs) or `kuberay_rule` (KubeRay manifests); `validate.py` runs
them after the file's shape was checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

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


def run_rules(checks: list[Check], doc: Doc) -> list[str]:
    return [problem for check in checks for problem in check(doc)]


def load_doc(path: Path) -> Doc | str:
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


# ------------------------------------------------------------------------------------------- helpers
def dotted(path: Any) -> str:
    return ".".join(str(part) for part in path)


def short(message: str, limit: int = 300) -> str:
    """jsonschema quotes the whole offending value; a node_config can be pages long."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
