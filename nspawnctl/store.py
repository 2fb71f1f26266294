"""The image store: one bootstrapped root filesystem per recipe, built once, then reused.

An image is built in a hidden directory beside its final place and renamed into place
only when complete, so an interrupted build never leaves an image that looks usable."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.bootstrap import Recipe, bootstrapper
from nspawnctl.config import ImageRef
from nspawnctl.log import Progress, log


@dataclass(frozen=True)
class Image:
    key: str
    path: Path
    recipe: Recipe

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


def recipe_for(ref: ImageRef) -> Recipe:
    return Recipe(method="debootstrap", distro=ref.distro, release=ref.release)


def image_key(recipe: Recipe) -> str:
    digest = hashlib.sha256(
        json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()
    ).hexdigest()
    return f"{recipe.distro}-{recipe.release}-{digest[:12]}"


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One builder at a time: two `add`s of a new image must not both bootstrap it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def find(self, recipe: Recipe) -> Image | None:
        path = self.root / image_key(recipe)
        return Image(path.name, path, recipe) if (path / "recipe.json").is_file() else None

    def ensure(self, recipe: Recipe) -> Image:
        """The image of `recipe`, bootstrapping it if it is not cached yet."""
        image = self.find(recipe)
        if image is not None:
            return image
        builder = bootstrapper(recipe.method)
        builder.check(recipe)
        with self._locked():
            image = self.find(recipe)  # built by someone else while we waited
            if image is not None:
                return image
            key = image_key(recipe)
            staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.root))
            try:
                progress = Progress(f"bootstrapping {recipe.distro}:{recipe.release}")
                log.info(
                    "bootstrapping image %s:%s with %s (a few minutes, once)",
                    recipe.distro,
                    recipe.release,
                    recipe.method,
                )
                builder.build(recipe, staging / "rootfs", progress)
                prepare_rootfs(staging / "rootfs")
                (staging / "recipe.json").write_text(
                    json.dumps(dataclasses.asdict(recipe), indent=2) + "\n"
                )
                staging.chmod(0o755)
                staging.rename(self.root / key)
                progress.done(f"image {key} is ready")
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        return Image(key, self.root / key, recipe)

    def images(self) -> list[Image]:
        found = []
        for recipe_file in sorted(self.root.glob("*/recipe.json")):
            recipe = Recipe(**json.loads(recipe_file.read_text()))
            recipe = dataclasses.replace(recipe, packages=tuple(recipe.packages))
            found.append(Image(recipe_file.parent.name, recipe_file.parent, recipe))
        return found


def prepare_rootfs(rootfs: Path) -> None:
    """Make a freshly bootstrapped tree a template that containers can be made from:
    nothing in it may identify one machine, because every container starts from it."""
    # Host keys and machine-id are per container; a shared one would make every
    # container the same SSH host and the same journal.
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/machine-id").write_text("")
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    # A persistent journal, so that the host's `journalctl -m` can read the guest's.
    (rootfs / "var/log/journal").mkdir(mode=0o2755, parents=True, exist_ok=True)
    # Downloaded packages are of no use to containers; they only cost disk.
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
