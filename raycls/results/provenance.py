"""Where a search came from: the git state of the search-space file's repository, and the YAML as run.

raycls is usually pip-installed (the cluster YAMLs do), so its own install folder says nothing; what a user
needs in order to rerun an experiment is the state of *their* repository, the one holding the search space:
its commit, whether it had changes, and a hash of those changes (two runs with the same hash ran the same
files). The YAML itself, with `--set` applied and every default filled in, is copied into the experiment
folder as `space.yaml`: `raycls tune <storage>/<experiment>/space.yaml` runs the same search again.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raycls.storage import ExperimentPaths

if TYPE_CHECKING:  # annotations only: `raycls leaderboard` starts without the config models (pydantic)
    from raycls.config.experiment import Experiment


@dataclass(frozen=True)
class GitState:
    commit: str | None = None
    dirty: bool | None = None
    # sha256 (first 16 hex digits) of `git diff HEAD` plus the search-space file when git does not track it.
    diff_sha: str | None = None


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, timeout=20)


def git_state(space_file: str | Path) -> GitState:
    """The git state of the repository holding `space_file` (all None outside a repository, or without git)."""
    path = Path(space_file).absolute()
    try:
        head = _git(path.parent, "rev-parse", "HEAD")
        if head.returncode != 0:
            return GitState()
        tracked = _git(path.parent, "diff", "HEAD", "--no-color").stdout
        untracked = _git(path.parent, "ls-files", "--error-unmatch", str(path)).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return GitState()
    changes = tracked + (path.read_bytes() if untracked and path.is_file() else b"")
    dirty = bool(changes)
    return GitState(
        head.stdout.decode().strip() or None, dirty, hashlib.sha256(changes).hexdigest()[:16] if dirty else None
    )


def space_as_run(experiment: Experiment) -> str:
    """The experiment as a search-space YAML: every section with its defaults, `--set` applied to `base`."""
    import yaml  # here, not at the top: `raycls leaderboard` imports this module and never writes YAML

    from raycls.config.load import resolve_trial

    sections: dict[str, Any] = {
        name: getattr(experiment, name).model_dump(mode="json")
        for name in ("experiment", "search", "scheduler", "wandb")
    }
    base = resolve_trial(
        experiment.model_copy(update={"experiment": experiment.experiment.model_copy(update={"fast_dev_run": False})})
    )
    sections["base"] = base.to_dict()
    sections["space"] = {
        path: param.model_dump(mode="json", exclude_none=True)
        for path, param in experiment.space.params.items()
        if path not in experiment.overrides
    }
    header = f"# {experiment.name} as run by raycls, from {experiment.source} (defaults filled in, --set applied)\n"
    return header + yaml.safe_dump(sections, sort_keys=False)


def write_space_as_run(experiment: Experiment, storage: str) -> str:
    """`<storage>/<experiment>/space.yaml`, whole or not at all (a rename locally; object stores write whole)."""
    paths = ExperimentPaths(storage, experiment.name)
    return paths.write_text(paths.space_file(), space_as_run(experiment))
