"""The image store: one root filesystem per recipe, built once, kept read-only, shared by
every container made from it (each container is a copy-on-write layer over it).

    images/KEY/recipe.json    what built it
    images/KEY/v1, v2, ...    versions; `image update` makes the next one
    images/KEY/current        symlink to the newest version

A version is built in a hidden directory and renamed into place only when complete,
so an interrupted build or update never leaves anything that looks usable. A container
mounts one exact version, so an update reaches it on its next start, never under it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.atomic import write_atomic
from nspawnctl.bootstrap import bootstrapper
from nspawnctl.errors import OperationError, UsageError
from nspawnctl.faults import checkpoint
from nspawnctl.guesttree import copy_tree, delete, walk
from nspawnctl.log import Progress, log
from nspawnctl.recipe import TEMPLATE, Recipe
from nspawnctl.run import run
from nspawnctl.userns import RANGE


@dataclass(frozen=True)
class Image:
    key: str
    path: Path
    recipe: Recipe

    @property
    def current(self) -> Path:
        """The newest version's directory (the root filesystem new mounts use)."""
        return self.path / os.readlink(self.path / "current")

    @property
    def next_version(self) -> str:
        """The name `image update` gives the version it makes."""
        return f"v{int(self.versions()[-1].name[1:]) + 1}"

    def versions(self) -> list[Path]:
        return sorted(
            (p for p in self.path.glob("v[0-9]*") if p.name[1:].isdigit()),
            key=lambda p: int(p.name[1:]),
        )

    def version_with(self, digest: str) -> Path | None:
        """Its version whose version_digest is `digest`, current or not."""
        return next((v for v in self.versions() if version_digest(v) == digest), None)


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time: two `add`s of a new image must not both bootstrap it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def find(self, recipe: Recipe) -> Image | None:
        path = self.root / recipe.key
        if not (path / "recipe.json").is_file():
            return None
        return Image(path.name, path, Recipe.from_json((path / "recipe.json").read_text()))

    def matching(self, key_or_image: str) -> list[Image]:
        """The image whose key this is, else every image of this name: one name may
        stand for several recipes (debian:bookworm plain, and with packages)."""
        key = (
            key_or_image.replace(":", "-", 1) if key_or_image.startswith(TEMPLATE) else key_or_image
        )
        images = self.images()
        return [i for i in images if i.key == key] or [i for i in images if i.recipe.image == key]

    def get(self, key_or_image: str) -> Image:
        """An image by its key (debian-bookworm-0123abcd) or its name (template:web), if
        the name is of one image only: the name alone never chooses among several."""
        found = self.matching(key_or_image)
        if not found:
            raise UsageError(
                f"no image {key_or_image!r} in {self.root}", hint="see `nspawnctl image list`"
            )
        if len(found) > 1:
            raise UsageError(
                f"{key_or_image} names {len(found)} images: "
                + "; ".join(f"{i.key} ({i.recipe.describe()})" for i in found),
                hint="give the key of the one you mean, or --all for every one of them",
            )
        return found[0]

    def ensure(self, recipe: Recipe) -> Image:
        """The image of `recipe`, bootstrapping it if it is not cached yet."""
        image = self.find(recipe)
        if image is not None:
            return image
        if recipe.method == TEMPLATE:
            raise UsageError(
                f"no image {recipe.image} in the store",
                hint="make it with `nspawnctl image import FILE "
                f"{recipe.name}`, or give `bootstrap: {{method: tar, "
                "source: FILE}`",
            )
        builder = bootstrapper(recipe.method)
        builder.check(recipe)
        with self.locked():
            image = self.find(recipe)  # built by someone else while we waited
            if image is not None:
                return image
            return self._build(
                recipe, lambda rootfs, progress: builder.build(recipe, rootfs, progress)
            )

    def import_tree(self, recipe: Recipe, source: Path) -> Image:
        """A new image from an existing root filesystem tree (a template)."""
        with self.locked():
            self._refuse_existing(recipe)
            return self._build(recipe, lambda rootfs, _progress: _copy_tree(source, rootfs))

    def receive(self, recipe: Recipe, archive: Path, digest: str | None = None) -> Path:
        """A version of image `recipe` made of an archive of it from another host (`image
        export` there), under the recipe's own key, so that the containers naming it find
        it here and nothing is built again; the version's path. The archive is read as
        every imported one is (bootstrap/tar.py: it may be hostile). `digest`: the
        version_digest it had there; another one here and nothing is kept.
        An image that is here already gets it as one more version beside its current one
        (the containers that come with it sit on it; the next `image update` moves them
        on, as it moves every other), unless one of its versions is that very one."""
        unpacked = Recipe(method="tar", source=str(archive))
        builder = bootstrapper("tar")
        builder.check(unpacked)

        def fill(rootfs: Path, progress: Progress) -> None:
            builder.build(unpacked, rootfs, progress)

        with self.locked():
            image = self.find(recipe)
            if image is None:
                return self._build(recipe, fill, digest=digest).current
            if digest is not None and (there := image.version_with(digest)) is not None:
                return there
            number = int(image.next_version[1:])
            staging = image.path / f".v{number}.tmp"
            if staging.exists():  # left by an interrupted update
                delete(staging)
            version = image.path / f"v{number}"
            digest_cache(version).unlink(missing_ok=True)  # of a version deleted since
            try:
                fill(staging, Progress(f"receiving {recipe.image}"))
                finish_rootfs(staging, recipe.source or recipe.image)
                _check_digest(staging, digest, recipe)
                staging.rename(version)
            except BaseException:
                delete(staging)
                raise
            finally:
                # Worked out on the staging name: kept under the version's, if it is one.
                kept = digest_cache(staging)
                with contextlib.suppress(OSError):
                    if version.is_dir():
                        kept.rename(digest_cache(version))
                    kept.unlink(missing_ok=True)
            return version

    def _refuse_existing(self, recipe: Recipe) -> None:
        if self.find(recipe) is not None:
            raise UsageError(
                f"image {recipe.image} ({recipe.key}) exists already",
                hint=f"`nspawnctl image remove {recipe.key}` first",
            )

    def _build(
        self,
        recipe: Recipe,
        fill: Callable[[Path, Progress], None],
        *,
        digest: str | None = None,
    ) -> Image:
        staging = Path(tempfile.mkdtemp(prefix=f".build-{recipe.key}-", dir=self.root))
        try:
            progress = Progress(f"building {recipe.image}")
            log.info("building image %s (%s)", recipe.image, recipe.describe())
            fill(staging / "v1", progress)
            finish_rootfs(staging / "v1", recipe.source or recipe.image)
            _check_digest(staging / "v1", digest, recipe)
            (staging / "recipe.json").write_text(recipe.to_json())
            (staging / "current").symlink_to("v1")
            staging.chmod(0o755)
            staging.rename(self.root / recipe.key)
            progress.done(f"image {recipe.image} is ready ({recipe.key})")
        finally:
            if staging.exists():
                delete(staging)
        image = self.find(recipe)
        assert image is not None
        return image

    def update(self, image: Image, command: Sequence[str]) -> tuple[Path, Path]:
        """Run `command` in a copy of the current version and make that copy the new
        current version. Returns (old, new). The old version stays for as long as a
        running container still has it mounted."""
        with self.locked():
            old = image.current
            number = int(image.next_version[1:])
            staging = image.path / f".v{number}.tmp"
            if staging.exists():  # left by an interrupted update
                delete(staging)
            try:
                # A digest kept for an earlier version of this number, deleted since.
                digest_cache(image.path / f"v{number}").unlink(missing_ok=True)
                copy_tree(old, staging)
                checkpoint("image update: copied")
                run(
                    [
                        "systemd-nspawn",
                        "--quiet",
                        "--register=no",
                        f"--directory={staging}",
                        "--link-journal=no",
                        "--timezone=off",
                        "--resolv-conf=bind-host",
                        f"--machine=update-{number}",
                        "--",
                        *command,
                    ],
                    progress=Progress(f"updating {image.recipe.image}"),
                )
                checkpoint("image update: command run")
                finish_rootfs(staging, image.recipe.image)
                new = image.path / f"v{number}"
                staging.rename(new)
                checkpoint("image update: new version in place")
            except BaseException:
                delete(staging)
                raise
            link = image.path / ".current.tmp"
            link.unlink(missing_ok=True)
            link.symlink_to(new.name)
            link.rename(image.path / "current")  # atomic: readers see old or new
            checkpoint("image update: current switched")
        return old, new

    def collect(self, image: Image, in_use: set[Path]) -> list[Path]:
        """Delete versions that are neither current nor mounted; return them."""
        gone = []
        with self.locked():
            for version in image.versions():
                if version != image.current and version not in in_use:
                    delete(version)
                    digest_cache(version).unlink(missing_ok=True)
                    gone.append(version)
        return gone

    def remove(self, image: Image) -> None:
        with self.locked():
            doomed = image.path.with_name(f".{image.key}.removing")
            image.path.rename(doomed)
            delete(doomed)

    def images(self) -> list[Image]:
        found = []
        for recipe_file in sorted(self.root.glob("*/recipe.json")):
            path = recipe_file.parent
            found.append(Image(path.name, path, Recipe.from_json(recipe_file.read_text())))
        return found


def _check_digest(version: Path, digest: str | None, recipe: Recipe) -> None:
    if digest is not None and (made := version_digest(version)) != digest:
        raise OperationError(
            f"image {recipe.image}: what arrived is not the version it was made of "
            f"(digest {made[:12]}, expected {digest[:12]})",
            hint="export it again; see `nspawnctl image list --json --digest` there",
        )


def _copy_tree(source: Path, target: Path) -> None:
    copy_tree(source, target)


def finish_rootfs(rootfs: Path, origin: str) -> None:
    """What every image needs, whatever built it. The tree is the guest's: nothing here
    may follow a link in it, or an `etc -> /etc` would make us edit the host's files."""
    refuse_host_symlinks(rootfs, origin)
    sanitize(rootfs)
    verify_rootfs(rootfs, origin)
    strip_identity(rootfs)


# Every directory of an image that the store opens from the host.
_VISITED_BY_HOST = (
    "etc/ssh",
    "var/lib/dbus",
    "var/log/journal",
    "var/cache/apt/archives",
    "usr/lib/systemd",
    "lib/systemd",
    "dev",
    "proc",
    "sys",
    "run",
)


def refuse_host_symlinks(
    rootfs: Path, origin: str, visited: Sequence[str] = _VISITED_BY_HOST
) -> None:
    """Refuse a tree where a symlink would lead nspawnctl, working from the host on the
    paths `visited`, out of the tree: the host resolves an absolute link to its own files."""
    root = os.path.realpath(rootfs)
    for path in visited:
        parts = Path(path).parts
        for depth in range(1, len(parts) + 1):
            rel = os.path.join(*parts[:depth])
            resolved = os.path.realpath(rootfs / rel)
            if os.path.commonpath([root, resolved]) != root:
                link = rootfs / rel
                where = f" -> {os.readlink(link)}" if link.is_symlink() else ""
                raise OperationError(
                    f"{origin}: /{rel}{where} leads out of the root filesystem",
                    hint="nspawnctl works on images from the host, where an absolute "
                    "link means the host's own files; make the link relative "
                    "(lib -> usr/lib, not lib -> /usr/lib)",
                )


def sanitize(rootfs: Path) -> None:
    """No device nodes and nothing of a running system: a device node copied into a
    guest is a door from the container to the host's devices. systemd-nspawn gives
    every container a fresh /dev, /proc, /sys and /run of its own. A set-uid or set-gid
    file owned by an id no container maps (65536 and up: not the image's own, it came
    from another host's ids) loses that bit: it would be nobody's in a container, and
    a set-id program of some host user's outside one. The tree may come from anyone
    (an archive, a directory): it is walked without following a link, to any depth."""
    for top in ("dev", "proc", "sys", "run"):
        path = rootfs / top
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    delete(child)
                else:
                    child.unlink()
        elif not os.path.lexists(path):
            path.mkdir(mode=0o755)
    devices: list[str] = []
    stripped: list[str] = []
    for entry in walk(rootfs):
        st = entry.stat
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.unlink(entry.name, dir_fd=entry.parent)
            devices.append(entry.path)
        elif stat.S_ISREG(st.st_mode) and _foreign_set_id(st):
            with entry.opened() as inode:
                os.chmod(inode, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            stripped.append(entry.path)
    if devices:
        log.warning("left out %d device node(s), e.g. %r", len(devices), "/" + devices[0])
    if stripped:
        log.warning(
            "took the set-uid/set-gid bit from %d file(s) owned by an id no container "
            "maps (65536 or more), e.g. %r",
            len(stripped),
            "/" + stripped[0],
        )


def _foreign_set_id(st: os.stat_result) -> bool:
    return bool(
        (st.st_mode & stat.S_ISUID and st.st_uid >= RANGE)
        or (st.st_mode & stat.S_ISGID and st.st_gid >= RANGE)
    )


def verify_rootfs(rootfs: Path, origin: str) -> None:
    """A container boots with systemd and is reached through sshd: refuse a tree that
    has neither, with what is missing."""
    needs = {
        "/etc/os-release": ("etc/os-release", "usr/lib/os-release"),
        "systemd (/usr/lib/systemd/systemd)": ("usr/lib/systemd/systemd", "lib/systemd/systemd"),
    }
    for what, candidates in needs.items():
        if not any(os.path.lexists(rootfs / c) for c in candidates):
            raise OperationError(
                f"{origin} is not a root filesystem nspawnctl can boot: it has no {what}",
                hint="give the archive or directory of a whole OS tree "
                "with systemd and openssh-server installed",
            )


def strip_identity(rootfs: Path) -> None:
    """Nothing in an image may identify one machine, because every container starts
    from it: host keys and machine-id are made per container."""
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    machine_id_file = rootfs / "etc/machine-id"
    if machine_id_file.is_symlink():
        machine_id_file.unlink()
    machine_id_file.write_text("")
    # The building machine's own (debootstrap copies them): its name server means
    # nothing on a container's private network, where nspawn leaves the file as it is,
    # and makes every lookup wait for nothing; the name is each container's own. A
    # link (to systemd-resolved's stub, say) is the image's design, and stays.
    for own in ("etc/resolv.conf", "etc/hostname"):
        path = rootfs / own
        if path.is_file() and not path.is_symlink():
            path.unlink()
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    # A persistent journal, so that the host's `journalctl -m` can read the guest's.
    (rootfs / "var/log/journal").mkdir(mode=0o2755, parents=True, exist_ok=True)
    # Downloaded packages are of no use to containers; they only cost disk.
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def digest_cache(version: Path) -> Path:
    """Where a version's digest is kept: beside it, hidden."""
    return version.parent / f".{version.name}.sha256"


def version_digest(version: Path) -> str:
    """A digest of one version's whole tree: every name, its type, mode and owner, a
    file's contents, a link's target, a device's number. Two hosts have the same version
    of an image only if this is the same (`migrate` compares them: a name or a recipe
    says what was asked for, not what was built). A version never changes once made, so
    it is worked out once (seconds for a few hundred MB) and kept beside it."""
    cache = digest_cache(version)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        kept = cache.read_text().strip()
        if len(kept) == 64 and all(c in "0123456789abcdef" for c in kept):
            return kept
    total = hashlib.sha256()
    for entry in walk(version):
        st = entry.stat
        name = os.fsencode(entry.path)
        total.update(b"%s\0%o\0%d\0%d\0" % (name, st.st_mode, st.st_uid, st.st_gid))
        if stat.S_ISREG(st.st_mode):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            with open(os.open(entry.name, flags, dir_fd=entry.parent), "rb") as f:
                total.update(hashlib.file_digest(f, "sha256").digest())
        elif stat.S_ISLNK(st.st_mode):
            total.update(os.fsencode(os.readlink(entry.name, dir_fd=entry.parent)))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            total.update(b"%d" % st.st_rdev)
    digest = total.hexdigest()
    with contextlib.suppress(OSError):  # a read-only store: worked out again next time
        write_atomic(cache, digest + "\n", 0o644)
    return digest
