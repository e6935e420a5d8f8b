"""Every module under raycls/ imports, none skipped: the fast tier (`pytest -m "not slow"`) loads them all, so
a broken import in a module only the slow searches reach still fails in minutes."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import raycls

ROOT = Path(raycls.__path__[0])


def source_modules() -> set[str]:
    """The dotted names of raycls/**/*.py, a package by its __init__.py."""
    names = set()
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports() -> None:
    # walk_packages imports each package to list its modules: a package that fails raises here, named.
    walked = {info.name for info in pkgutil.walk_packages(raycls.__path__, "raycls.")}
    # A folder without __init__.py would be left out of the walk: the files on disk are the list.
    assert walked | {"raycls"} == source_modules(), sorted(source_modules() ^ (walked | {"raycls"}))
    for name in sorted(walked):
        importlib.import_module(name)  # a failure's traceback names the module
