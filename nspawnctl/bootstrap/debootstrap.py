"""Debian and Ubuntu images with debootstrap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nspawnctl.bootstrap import BASE_PACKAGES, Bootstrapper, Recipe
from nspawnctl.errors import OperationError
from nspawnctl.run import run

_SCRIPTS = Path("/usr/share/debootstrap/scripts")


class Debootstrap(Bootstrapper):
    method = "debootstrap"

    def check(self, recipe: Recipe) -> None:
        if not _SCRIPTS.is_dir():
            raise OperationError("debootstrap is not installed", hint="apt-get install debootstrap")
        if not (_SCRIPTS / recipe.release).exists():
            known = sorted(p.name for p in _SCRIPTS.iterdir() if p.is_symlink() or p.is_file())
            raise OperationError(
                f"debootstrap does not know the release {recipe.release!r}",
                hint="known here: " + ", ".join(known[-12:]),
            )

    def build(self, recipe: Recipe, target: Path, progress: Callable[[str], None]) -> None:
        packages = ",".join(dict.fromkeys((*BASE_PACKAGES, *recipe.packages)))
        argv: list[str | Path] = [
            "debootstrap",
            "--variant=minbase",
            f"--include={packages}",
            recipe.release,
            target,
        ]
        if recipe.mirror:
            argv.append(recipe.mirror)
        run(argv, progress=progress)
