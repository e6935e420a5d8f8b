"""The design rules that keep the layers apart, checked in fresh interpreters (import state is global)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from .conftest import REPO

HEAVY = ("ray", "wandb", "raycls.tune")


def modules_after(code: str) -> set[str]:
    """The modules loaded by running `code` in a fresh interpreter."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "package",
    [
        "raycls.data",
        "raycls.models",
        "raycls.phases",
        "raycls.losses",
        "raycls.evaluate",
        "raycls.config",
        "raycls.cluster.validate",
        "raycls.cluster.preflight",
        "raycls.results.row",
    ],
)
def test_lower_layers_leave_ray_wandb_and_tune_out(package: str) -> None:
    loaded = modules_after(f"import {package}")
    assert not loaded & set(HEAVY), f"importing {package} loads {sorted(loaded & set(HEAVY))}"


def test_loading_a_space_leaves_the_training_loop_out() -> None:
    loaded = modules_after(
        "from raycls.config import load_experiment\n"
        "load_experiment('search_spaces/quickstart.yaml')\n"
        "load_experiment('search_spaces/pipeline.yaml')"
    )
    # (wandb may load here: timm's model lookup imports timm.utils, which imports wandb when it is installed.)
    assert not loaded & {"raycls.train", "raycls.tune", "ray", "optuna"}, sorted(
        loaded & {"raycls.train", "raycls.tune", "ray", "optuna"}
    )


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_train_package_never_imports_ray_tune() -> None:
    for path in (REPO / "raycls" / "train").glob("*.py"):
        tune = {m for m in imported_modules(path) if m == "ray.tune" or m.startswith(("ray.tune.", "raycls.tune"))}
        assert not tune, f"{path.name} imports {sorted(tune)}: Tune code belongs in raycls/tune/"


def test_only_tune_and_train_import_ray() -> None:
    # search.py imports ray.tune.schedulers inside its trial-scheduler factories, which only the driver calls:
    # the registry itself must load without Ray, so that a config's `scheduler.name` is checked on load.
    # deliver/serve.py is the Ray Serve application (`raycls serve`), imported only by that command.
    allowed = ("tune/", "train/ray_train.py", "train/ray_data.py", "search.py", "deliver/serve.py")
    for path in (REPO / "raycls").rglob("*.py"):
        relative = path.relative_to(REPO / "raycls").as_posix()
        if relative.startswith(allowed):
            continue
        ray = {m for m in imported_modules(path) if m == "ray" or m.startswith("ray.")}
        assert not ray, f"raycls/{relative} imports {sorted(ray)}: Ray stays in raycls/tune/ and train/ray_train.py"
