"""Bootstrap methods: one module each, registered by subclassing `Bootstrapper`.

A method fills an empty directory with a root filesystem. What every image needs after
that (no device nodes, no machine identity, a persistent journal) is done once, for
every method, by the image store."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from nspawnctl.errors import UsageError
from nspawnctl.recipe import METHODS, Recipe

Progress = Callable[[str], None]


class Bootstrapper(ABC):
    method: ClassVar[str]
    registry: ClassVar[dict[str, type[Bootstrapper]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Bootstrapper.registry[cls.method] = cls

    @abstractmethod
    def check(self, recipe: Recipe) -> None:
        """Fail early, before anything is written, if the recipe cannot be built here:
        a missing tool, a missing source, an unknown release. Raise NspawnctlError."""

    @abstractmethod
    def build(self, recipe: Recipe, target: Path, progress: Progress) -> None:
        """Fill `target` (does not exist yet; its parent does) with a root filesystem."""


def bootstrapper(method: str) -> Bootstrapper:
    if method in METHODS and method not in Bootstrapper.registry:
        importlib.import_module(f"nspawnctl.bootstrap.{method}")
    try:
        return Bootstrapper.registry[method]()
    except KeyError:
        raise UsageError(
            f"unknown bootstrap method {method!r}", hint="known: " + ", ".join(METHODS)
        ) from None
