"""A registry is a dict from name to factory plus a decorator, with timm's verbs.

Every family a user can extend (datasets, backbones, phases, optimizers, schedulers, augmentations) has one.
An unknown name raises a RegistryError that lists the known names, so a typo in a YAML is one glance to fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from raycls.errors import RegistryError

T = TypeVar("T")

FAMILIES: dict[str, "Registry"] = {}


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
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.family} {name!r}; known: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# Each family's registry is created in the package that implements it (data/, models/, phases/, train/).
# Configs validate names against them; these are the modules whose import fills the built-in entries.
# Importing by name here keeps static imports pointing one way (config never imports a higher layer).
BUILTIN_MODULES = (
    "raycls.data",
    "raycls.models",
    "raycls.losses",
    "raycls.phases",
    "raycls.train.optim",
)


def load_builtins() -> None:
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def check_name(family: str, name: str) -> str:
    """Raise RegistryError (listing the known names) unless `name` is registered in `family`."""
    load_builtins()
    FAMILIES[family].get(name)
    return name
