"""The design rules that keep the layers apart, checked in fresh interpreters (import state is global)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

HEAVY = ("ray", "wandb", "raycls.tune")


LAYERS = [
    "raycls.data",
    "raycls.models",
    "raycls.phases",
    "raycls.losses",
    "raycls.evaluate",
    "raycls.config",
    "raycls.cluster.validate",
    "raycls.cluster.preflight",
    "raycls.results.row",
]
LOAD_A_SPACE = (
    "from raycls.config import load_experiment\n"
    "load_experiment('search_spaces/quickstart.yaml')\n"
    "load_experiment('search_spaces/pipeline.yaml')"
)
STEPS_IN_ONE_INTERPRETER = """
import json, sys
steps, seen, added = json.loads(sys.argv[1]), set(sys.modules), {}
for name, code in steps:
    exec(code, {})
    added[name] = sorted(set(sys.modules) - seen)
    seen = set(sys.modules)
print(json.dumps(added))
"""


@pytest.fixture(scope="module")
def loaded_by() -> dict[str, set[str]]:
    """The modules each step added, the steps run in turn in one fresh interpreter (import state is global;
    one interpreter instead of one per step saves ~4 s each). A step is charged only with what was not
    loaded before it, so a heavy import shows at the first step whose imports bring it in."""
    steps = [(package, f"import {package}") for package in LAYERS] + [("load a space", LOAD_A_SPACE)]
    out = subprocess.run(
        [sys.executable, "-c", STEPS_IN_ONE_INTERPRETER, json.dumps(steps)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]  # a step that cannot even be imported says why
    return {name: set(modules) for name, modules in json.loads(out.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("package", LAYERS)
def test_lower_layers_leave_ray_wandb_and_tune_out(package: str, loaded_by: dict[str, set[str]]) -> None:
    heavy = loaded_by[package] & set(HEAVY)
    assert not heavy, f"importing {package} loads {sorted(heavy)}"


def test_loading_a_space_leaves_the_training_loop_out(loaded_by: dict[str, set[str]]) -> None:
    # (wandb may load here: timm's model lookup imports timm.utils, which imports wandb when it is installed.)
    # Charged with every step's modules: the layers below it must not load the training loop either.
    loaded = set().union(*loaded_by.values()) & {"raycls.train", "raycls.tune", "ray", "optuna"}
    assert not loaded, sorted(loaded)


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


def import_graph() -> dict[str, set[str]]:
    """Every raycls module and the raycls modules it imports, anywhere in it (lazy imports inside functions
    included, TYPE_CHECKING ones too: a protocol is named where it is needed instead)."""
    root = REPO / "raycls"
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in root.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
                found.add(node.module)
        # `from raycls import names` names a module; `from raycls.x import f` its module.
        graph[name] = {m for m in found if m in modules and m != name and not name.startswith(f"{m}.")}
    return graph


def test_no_module_imports_itself_through_others() -> None:
    """No import circles (a package's __init__ handing on its modules' names aside): each module can be
    read, tested and moved with what it imports and nothing that imports it."""
    graph = import_graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if child.endswith("__init__") or graph.get(child) is None:
                continue
            if state.get(child) == "open":
                cycles.append(path[path.index(child) :] + [child])
            elif child not in state:
                visit(child, [*path, child])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    packages = {m for m in graph if (REPO / Path(*m.split("."))).is_dir()}
    real = [c for c in cycles if not set(c) & packages]  # a package's face imports its own modules
    assert real == [], real


def test_config_checks_names_through_registries_not_the_layers_above() -> None:
    """config/ validates dataset, loss, metric, OOD and shift names through the registries that data, losses
    and evaluate fill, so it imports none of them."""
    graph = import_graph()
    above = ("raycls.data", "raycls.losses", "raycls.evaluate", "raycls.models", "raycls.phases", "raycls.train")
    wrong = {
        m: sorted(i for i in imports if i.startswith(above))
        for m, imports in graph.items()
        if m.startswith("raycls.config")
    }
    assert not any(wrong.values()), wrong
