"""Update an image once for every container made from it."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawnctl import backup
from nspawnctl.atomic import write_atomic
from nspawnctl.backup import Snapshot
from nspawnctl.bootstrap import debootstrap, dnf
from nspawnctl.bus import Systemd
from nspawnctl.config import ContainerConfig
from nspawnctl.container import installed_uid_base, rendering_for, users_of
from nspawnctl.errors import OperationError, UsageError
from nspawnctl.faults import checkpoint
from nspawnctl.guesttree import walk
from nspawnctl.intent import Transaction
from nspawnctl.layers import Layer, overlay_lowers
from nspawnctl.log import log
from nspawnctl.paths import Paths
from nspawnctl.recipe import Recipe
from nspawnctl.render import Rendering, host_targets
from nspawnctl.store import Image, ImageStore
from nspawnctl.userns import idmapped_lowers, unmount

# The distribution's upgrade, and what nspawnctl puts in every image (an image built by
# an older nspawnctl gets what a newer one added to BASE_PACKAGES).
_UPGRADE = {
    "debootstrap": [
        "sh",
        "-c",
        "apt-get update && export DEBIAN_FRONTEND=noninteractive && "
        "apt-get -y -o Dpkg::Options::=--force-confold dist-upgrade && "
        f"apt-get -y --no-install-recommends install {' '.join(debootstrap.BASE_PACKAGES)} && "
        "apt-get clean",
    ],
    "dnf": ["sh", "-c", f"dnf -y upgrade && dnf -y install {' '.join(dnf.BASE_PACKAGES)}"],
}


@dataclass(frozen=True)
class UpdateReport:
    old: Path
    new: Path
    restart: list[str]  # running containers still on an older version
    conflicts: dict[str, list[str]]  # container -> files it changed that the update changed too
    collected: list[Path]  # versions deleted because nothing uses them any more
    snapshots: list[Snapshot]  # taken before the update, one per container of the image


def default_command(recipe: Recipe) -> list[str]:
    try:
        return _UPGRADE[recipe.method]
    except KeyError:
        raise UsageError(
            f"{recipe.image} has no distribution upgrade nspawnctl knows",
            hint=f"give the command: nspawnctl image update {recipe.image} -- CMD...",
        ) from None


def update_image(
    paths: Paths, image: Image, command: Sequence[str], *, snapshot: bool = True
) -> UpdateReport:
    store = ImageStore(paths.image_dir)
    users = users_of(paths, image)
    # So that a bad update can be undone, container by container (`nspawnctl rollback`):
    # each snapshot names the version it sat on, which is kept while it exists.
    names = [c.name for c in users] if snapshot else []
    taken = backup.before_update(paths, names, image.next_version)
    # Killed once `current` has moved, the users' units would name the old version: the
    # next nspawnctl finishes the update (recovery.py), which only repoints them.
    with (
        Systemd.connect() as systemd,
        Transaction(paths.intent_dir, "image-update", image.key, systemd, forward=True),
    ):
        try:
            old, new = store.update(image, command)
        except BaseException:
            backup.discard(taken)
            raise
        backup.drop_earlier(paths, taken)
        image = store.get(image.key)
        renderings = repoint_users(paths, image, systemd, users)
    lowers = overlay_lowers()
    restart = sorted(
        c.name for c in users if lowers.get(paths.machine_dir(c.name)) not in (None, new)
    )
    # Each container's own files differ (its proxies, its native drop-ins): its own set.
    conflicts = {
        name: changed_in_both(
            Layer.of(paths, name).upper, old, new, {str(f.path) for f in rendering.guest}
        )
        for name, rendering in renderings.items()
    }
    # Every mounted version, whoever mounted it (even a container whose YAML is broken),
    # and every version a snapshot sat on.
    in_use = set(lowers.values()) | backup.versions_in_use(paths)
    # ID-mapped binds of this image's older versions that no container runs on: each
    # container's next start binds the new one.
    unmount(
        [
            bind
            for bind in idmapped_lowers()
            if bind.version.parent == image.path
            and bind.version != new
            and bind.version not in lowers.values()
        ]
    )
    return UpdateReport(
        old,
        new,
        restart,
        {k: v for k, v in conflicts.items() if v},
        store.collect(image, in_use),
        taken,
    )


def repoint_users(
    paths: Paths, image: Image, systemd: Systemd, users: Sequence[ContainerConfig] | None = None
) -> dict[str, Rendering]:
    """Make each user's mount unit name the image's current version; it takes effect at
    the next mount, i.e. the container's next start. A running container is not touched.
    Only the mount unit (and with a user namespace the unit of the ID-mapped view of the
    image): the rest must stay as installed, matching the guest's own files."""
    if users is None:
        users = users_of(paths, image)
    # As installed: the uid range of each layer (a change of `security.user_namespace`
    # is `apply`'s business, which moves the layer too).
    renderings = {
        c.name: rendering_for(paths, c, image, uid_base=installed_uid_base(paths, c.name))
        for c in users
    }
    for name, rendering in renderings.items():
        targets = host_targets(paths, name)
        image_units = {targets["container.mount.j2"], targets["container.lower.j2"]}
        for file in rendering.host:
            if Path(file.path) in image_units:
                write_atomic(Path(file.path), file.text, file.mode)
                checkpoint(f"image update: repointed {file.path}")
    systemd.reload()
    return renderings


def changed_in_both(upper: Path, old: Path, new: Path, own: set[str]) -> list[str]:
    """Files a container has its own copy of (in its layer) that the update changed in
    the image: the container's copy wins, so the update does not reach them. The layer
    is the guest's (any shape, changing while it runs): a walk that fails or takes over
    a minute is reported as such, and the update stands."""
    found = []
    try:
        for entry in walk(upper, deadline=time.monotonic() + 60):
            relative = entry.path
            if not stat.S_ISREG(entry.stat.st_mode):
                continue
            if relative in own or relative.startswith("etc/ssh/ssh_host_"):
                continue  # nspawnctl's own per-container files
            if _fingerprint(old / relative) != _fingerprint(new / relative):
                found.append("/" + relative)
    except (OSError, OperationError, TimeoutError) as err:
        log.warning("could not compare %s's own files with the image: %s", upper.parent.name, err)
    return sorted(found)


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_mode, st.st_size, st.st_mtime_ns
