"""A registry is a dict from name to factory plus a decorator, with timm's verbs (`create`, `list`).

Every family a user can extend (datasets, backbones, phases, losses, optimizers, lr schedules, samplers,
trial schedulers, ...) has one, created in the module that implements the family. Each family's built-in
entries load lazily: the first lookup of a name imports the module that registers them (BUILTIN_MODULES),
so validating a config imports the optimizers, not the training loop, and never Ray.
An unknown name raises a RegistryError that lists the known names, so a typo in a YAML is one glance to fix.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from raycls.errors import RegistryError

T = TypeVar("T")

FAMILIES: dict[str, Registry] = {}

# The module whose import registers each family's built-in entries. Import by name keeps static imports
# pointing one way: config validates names without importing a higher layer.
BUILTIN_MODULES: dict[str, str] = {
    "dataset": "raycls.data.datasets",
    "resize": "raycls.images",
    "augmentation": "raycls.data.policies",  # imports raycls.data.augment: every op, base and policy
    "model": "raycls.models",
    "small-input adapter": "raycls.models",
    "model module": "raycls.models.modules",
    "loss": "raycls.losses",
    "margin loss": "raycls.losses",
    "kd loss": "raycls.losses",
    "alpha schedule": "raycls.losses",
    "phase": "raycls.phases",
    "batch mixer": "raycls.phases.mixing",
    "optimizer": "raycls.optim",
    "lr schedule": "raycls.optim",
    "sampler": "raycls.search",
    "trial scheduler": "raycls.search",
    "eval suite": "raycls.evaluate.suite",
    "eval step": "raycls.evaluate.suite",
    "eval figure": "raycls.evaluate.figures",
    "ood set": "raycls.evaluate.suite",
    "shift set": "raycls.evaluate.suite",
    "ood scorer": "raycls.evaluate.ood",
    "corruption": "raycls.evaluate.shift",
    "tta view": "raycls.evaluate.tta",
    "report section": "raycls.report.figures",
    "adapter": "raycls.models.adapters",
    "serve engine": "raycls.deliver.engines",
    "after step": "raycls.after",
}


class Registry(Generic[T]):
    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, T] = {}
        FAMILIES[family] = self

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@DATASETS.register("digits")`."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.family} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            load_family(self.family)
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(f"unknown {self.family} {name!r}; known: {', '.join(self.names())}") from None

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """timm's verb: the entry registered as `name`, called with the given arguments."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def list(self, pattern: str = "*") -> list[str]:
        """timm's verb: the registered names matching a shell-style pattern (`list("*face")`), sorted."""
        return fnmatch.filter(self.names(), pattern)

    def in_order(self) -> list[tuple[str, T]]:
        """The entries in the order they were registered (a report lays out its sections in this order)."""
        load_family(self.family)
        return list(self._entries.items())

    def names(self) -> list[str]:
        load_family(self.family)
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_family(self.family)
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def load_family(family: str) -> None:
    """Import the module that registers `family`'s built-in entries (once; later calls cost a dict lookup)."""
    module = BUILTIN_MODULES.get(family)
    if module is not None:
        importlib.import_module(module)


def load_builtins() -> None:
    """Every family's built-in entries (contract tests walk them all)."""
    for family in list(BUILTIN_MODULES):
        load_family(family)


def is_registered(family: str, name: str) -> bool:
    load_family(family)
    return name in FAMILIES[family]


def known(family: str) -> list[str]:
    """The registered names of a family, sorted."""
    load_family(family)
    return FAMILIES[family].names()


def check_name(family: str, name: str) -> str:
    """Raise RegistryError (listing the known names) unless `name` is registered in `family`."""
    load_family(family)
    FAMILIES[family].get(name)
    return name
