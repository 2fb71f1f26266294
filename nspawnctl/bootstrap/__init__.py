"""Bootstrap methods: one module each, registered by subclassing `Bootstrapper`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from nspawnctl.errors import UsageError

# What every guest needs to boot and be reached: systemd as init, a bus for
# machinectl, sshd for the passed socket.
BASE_PACKAGES = ("systemd", "dbus", "openssh-server", "iproute2")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what an image contains; equal recipes share an image."""

    method: str
    distro: str
    release: str
    mirror: str | None = None
    packages: tuple[str, ...] = ()


class Bootstrapper(ABC):
    method: ClassVar[str]
    registry: ClassVar[dict[str, type[Bootstrapper]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Bootstrapper.registry[cls.method] = cls

    @abstractmethod
    def check(self, recipe: Recipe) -> None:
        """Fail early, before anything is written, if the recipe cannot be built here."""

    @abstractmethod
    def build(self, recipe: Recipe, target: Path, progress: Callable[[str], None]) -> None:
        """Fill the empty directory `target` with a root filesystem."""


def bootstrapper(method: str) -> Bootstrapper:
    # Import for the side effect of registering every method.
    from nspawnctl.bootstrap import debootstrap  # noqa: F401, PLC0415

    try:
        return Bootstrapper.registry[method]()
    except KeyError:
        raise UsageError(
            f"unknown bootstrap method {method!r}",
            hint="known: " + ", ".join(sorted(Bootstrapper.registry)),
        ) from None
