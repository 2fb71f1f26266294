"""Debian and Ubuntu images with debootstrap."""

from __future__ import annotations

from pathlib import Path

from nspawnctl.bootstrap import Bootstrapper, Progress
from nspawnctl.errors import OperationError
from nspawnctl.recipe import Recipe
from nspawnctl.run import run

_SCRIPTS = Path("/usr/share/debootstrap/scripts")
# What every guest needs to boot and be reached: systemd as init, a bus for
# machinectl, sshd for the passed socket. And what the tools people point at an SSH
# server expect to find there: python3 (Ansible's modules), rsync, shutdown and reboot
# (systemd-sysv; Ansible's reboot module), an editor. The shared image pays for them
# once (about 40 MB), not each container.
BASE_PACKAGES = (
    "systemd",
    "dbus",
    "openssh-server",
    "iproute2",
    "python3",
    "rsync",
    "systemd-sysv",
    "vim-tiny",
)
_DEFAULT_MIRRORS = {"ubuntu": "http://archive.ubuntu.com/ubuntu"}  # Debian: debootstrap's own


class Debootstrap(Bootstrapper):
    method = "debootstrap"

    def check(self, recipe: Recipe) -> None:
        if not _SCRIPTS.is_dir():
            raise OperationError("debootstrap is not installed", hint="apt-get install debootstrap")
        if not (_SCRIPTS / recipe.release).exists():
            known = sorted(p.name for p in _SCRIPTS.iterdir())
            raise OperationError(
                f"debootstrap does not know the release {recipe.release!r}",
                hint="known here: " + ", ".join(known[-12:]),
            )

    def build(self, recipe: Recipe, target: Path, progress: Progress) -> None:
        packages = ",".join(dict.fromkeys((*BASE_PACKAGES, *recipe.packages)))
        argv: list[str | Path] = [
            "debootstrap",
            "--variant=minbase",
            f"--include={packages}",
            recipe.release,
            target,
        ]
        mirror = recipe.mirror or _DEFAULT_MIRRORS.get(recipe.distro)
        if mirror:
            argv.append(mirror)
        run(argv, progress=progress)
