"""Update an image once for every container made from it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.bus import Systemd
from nspawnctl.container import rendering_for, users_of
from nspawnctl.errors import UsageError
from nspawnctl.install import write_atomic
from nspawnctl.layers import Layer, overlay_lowers
from nspawnctl.paths import Paths
from nspawnctl.recipe import Recipe
from nspawnctl.render import host_targets
from nspawnctl.store import Image, ImageStore

_UPGRADE = {
    "debootstrap": [
        "sh",
        "-c",
        "apt-get update && DEBIAN_FRONTEND=noninteractive "
        "apt-get -y -o Dpkg::Options::=--force-confold dist-upgrade && apt-get clean",
    ],
    "dnf": ["dnf", "-y", "upgrade"],
}


@dataclass(frozen=True)
class UpdateReport:
    old: Path
    new: Path
    restart: list[str]  # running containers still on an older version
    conflicts: dict[str, list[str]]  # container -> files it changed that the update changed too
    collected: list[Path]  # versions deleted because nothing uses them any more


def default_command(recipe: Recipe) -> list[str]:
    try:
        return _UPGRADE[recipe.method]
    except KeyError:
        raise UsageError(
            f"{recipe.image} has no distribution upgrade nspawnctl knows",
            hint=f"give the command: nspawnctl image update {recipe.image} -- CMD...",
        ) from None


def update_image(paths: Paths, image: Image, command: Sequence[str]) -> UpdateReport:
    store = ImageStore(paths.image_dir)
    old, new = store.update(image, command)
    image = store.get(image.key)
    users = users_of(paths, image)
    renderings = {c.name: rendering_for(paths, c, image) for c in users}
    # Each user's mount unit now names the new version; it takes effect at the next
    # mount, i.e. the container's next start. A running container is not touched. Only
    # the mount unit: the rest must stay as installed, matching the guest's own files.
    with Systemd.connect() as systemd:
        for name, rendering in renderings.items():
            mount = host_targets(paths, name)["container.mount.j2"]
            for file in rendering.host:
                if Path(file.path) == mount:
                    write_atomic(mount, file.text, file.mode)
        systemd.reload()
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
    # Every mounted version, whoever mounted it (even a container whose YAML is broken).
    in_use = set(lowers.values())
    return UpdateReport(
        old, new, restart, {k: v for k, v in conflicts.items() if v}, store.collect(image, in_use)
    )


def changed_in_both(upper: Path, old: Path, new: Path, own: set[str]) -> list[str]:
    """Files a container has its own copy of (in its layer) that the update changed in
    the image: the container's copy wins, so the update does not reach them."""
    found = []
    for directory, _dirs, files in os.walk(upper):
        for name in files:
            relative = os.path.relpath(os.path.join(directory, name), upper)
            if relative in own or relative.startswith("etc/ssh/ssh_host_"):
                continue  # nspawnctl's own per-container files
            if _fingerprint(old / relative) != _fingerprint(new / relative):
                found.append("/" + relative)
    return sorted(found)


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_mode, st.st_size, st.st_mtime_ns
