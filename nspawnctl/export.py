"""A container in one tar file, and back: `export` and `import`.

    .nspawnctl-export/manifest.json   what it is (backup.Manifest): name, image recipe...
    .nspawnctl-export/config.yaml     the container's NAME.yaml
    upper/...                         its layer, or with --full:
    ./...                             its whole tree, layer over image (an image archive)

A full export is an image archive with the metadata beside the tree, which the tar
bootstrapper leaves out: `image import` makes a template of it as it is.

An archive to import is untrusted: every member is checked before anything is
extracted (see `_problem`), and then GNU tar, which guards on its own against names
that climb out, extracts it. Links inside the guest's tree may be absolute, as a guest's
are: they mean the guest's own files, and nspawnctl follows no link of a layer on the
paths it writes (container.create_layer checks)."""

from __future__ import annotations

import contextlib
import dataclasses
import lzma
import os
import posixpath
import stat
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from nspawnctl import container
from nspawnctl.atomic import write_atomic
from nspawnctl.backup import (
    Manifest,
    copy_running_layer,
    manifest_of,
    require_container,
    running_error,
)
from nspawnctl.bootstrap import tar
from nspawnctl.bus import Systemd
from nspawnctl.config import ContainerConfig, dump_config, load_yaml, parse_config
from nspawnctl.errors import OperationError, UsageError
from nspawnctl.faults import checkpoint
from nspawnctl.guesttree import delete, remove_tree
from nspawnctl.hold import held
from nspawnctl.layers import MACHINE_ID, Layer, prepare
from nspawnctl.names import check_machine_name
from nspawnctl.paths import Paths
from nspawnctl.recipe import TEMPLATE, Recipe, parse_image
from nspawnctl.run import run
from nspawnctl.store import ImageStore
from nspawnctl.userns import RANGE

METADATA = tar.EXPORT_METADATA
MANIFEST = f"{METADATA}/manifest.json"
CONFIG = f"{METADATA}/config.yaml"
UPPER = "upper"
_MAX_METADATA = 1 << 20  # bytes: a manifest or a YAML file is a few hundred
_HINT = "give a file that `nspawnctl export` wrote"


def export(
    paths: Paths, name: str, target: Path, *, full: bool, force: bool, draft: bool = False
) -> Manifest:
    """`draft`: a running container's layer is copied as it runs, not frozen for it: a
    first pass that an export of the stopped container replaces (migrate's pre-copy)."""
    config, config_text = require_container(paths, name)
    # Held: a connection that arrives meanwhile waits, and boots it once the archive is
    # written (the archive then holds what a stopped container has, as it says).
    with Systemd.connect() as systemd, held(systemd, paths, name) as live:
        if live and not force:
            raise running_error(name, f"nspawnctl export {name} FILE")
        checkpoint(f"export: holding {name}")
        return _export(paths, config, config_text, target, full=full, live=live, draft=draft)


def _export(
    paths: Paths,
    config: ContainerConfig,
    config_text: str,
    target: Path,
    *,
    full: bool,
    live: bool,
    draft: bool = False,
) -> Manifest:
    name = config.name
    # The store's recipe: for a template it says where the template came from.
    image = ImageStore(paths.image_dir).find(config.image)
    manifest = manifest_of(paths, config, live=live, full=full)
    if image is not None:
        manifest = dataclasses.replace(manifest, recipe=image.recipe)
    with (
        tempfile.TemporaryDirectory(prefix="nspawnctl-export-") as tmp,
        contextlib.ExitStack() as mounts,
    ):
        (Path(tmp) / METADATA).mkdir()
        write_atomic(Path(tmp) / MANIFEST, manifest.to_json(), 0o600)
        write_atomic(Path(tmp) / CONFIG, config_text, 0o600)
        sources = [(Path(tmp), [METADATA])]
        if not full:
            layer = Layer.of(paths, name).upper.parent  # on its own disk, if it has one
            if live:
                # tar walks by path names, which a running guest can swap for links:
                # the archive is made from a copy taken by descriptors (copy_live).
                layer = mounts.enter_context(_live_copy(paths, name, frozen=not draft))
            tar.create(target, [*sources, (layer, [UPPER])], live=live)
        else:
            # The tree stacked read-only for the while: a stopped container's layer, or a
            # copy of a running one's (its mounted tree is the guest's to swap under tar).
            copy = mounts.enter_context(_live_copy(paths, name)) / UPPER if live else None
            tree = mounts.enter_context(container.merged_view(paths, name, upper=copy))
            tar.create(target, [*sources, (tree, ["."])], excludes=tar.RUNTIME_EXCLUDES)
    return manifest


@contextlib.contextmanager
def _live_copy(paths: Paths, name: str, *, frozen: bool = True) -> Iterator[Path]:
    """A directory holding upper/, a copy of a running container's layer (of one instant,
    frozen for it, unless not `frozen`), beside the layers (on their file system),
    deleted afterwards."""
    where = Path(tempfile.mkdtemp(prefix=f".export-{name}-", dir=Layer.directory(paths)))
    try:
        copy_running_layer(paths, name, where / UPPER, frozen=frozen)
        yield where
    finally:
        delete(where)


@dataclasses.dataclass(frozen=True)
class Imported:
    config: ContainerConfig
    manifest: Manifest
    new_identity: bool  # a new machine-id and host key (the exported ones are in use)


def import_(
    paths: Paths, file: Path, name: str | None = None, *, image_digest: str | None = None
) -> Imported:
    """Recreate the container of an export, all or nothing. `image_digest`: on that
    version of its image (version_digest), not on the current one."""
    archive = file.absolute()
    if not archive.is_file():
        what = "no such file" if not os.path.lexists(archive) else "not a regular file"
        raise OperationError(f"{archive}: {what}", hint=_HINT)
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    # Beside the layers, so that the extracted layer is renamed into place, not copied.
    with tempfile.TemporaryDirectory(prefix=".import-", dir=paths.state_dir) as tmp:
        readable = _readable(archive, Path(tmp))
        manifest, config_text = _read(readable, archive)
        name = name or manifest.container
        try:
            check_machine_name(name)
        except ValueError as err:
            raise UsageError(f"{name!r} {err}", hint="give another NAME") from None
        _refuse_existing(paths, name)
        where = Path(f"{archive}:{CONFIG}")
        config = parse_config(name, load_yaml(config_text, where), where)
        config = dataclasses.replace(config, source=paths.config_file(name))
        if manifest.full:
            if image_digest is not None:
                raise UsageError("--image-digest is for an export of a layer, not --full")
            return _import_full(paths, archive, config, manifest)
        return _import_layer(
            paths, readable, config, config_text, manifest, image_digest=image_digest
        )


def _import_layer(
    paths: Paths,
    readable: Path,
    config: ContainerConfig,
    config_text: str,
    manifest: Manifest,
    *,
    image_digest: str | None = None,
) -> Imported:
    # A template's own recipe says what it was made from: built from that if missing.
    recipe = manifest.recipe if manifest.recipe.key == config.image.key else config.image
    # Before anything is written: a missing template is an error, a missing
    # distribution image is bootstrapped (as `add` would).
    image = ImageStore(paths.image_dir).ensure(recipe)
    version = None
    if image_digest is not None:
        version = image.version_with(image_digest)
        if version is None:
            raise OperationError(
                f"image {recipe.image} ({image.key}) has no version with digest "
                f"{image_digest[:12]}",
                hint="see `nspawnctl image list --json --digest`",
            )
    name = config.name
    staging = Layer(Layer.of(paths, name).path.with_name(f".{name}.import-{os.getpid()}"))
    try:
        prepare(staging, config.resources)
        # Into the layer's own disk, if it has one.
        tar.extract(readable, staging.upper.parent, [UPPER])
        staging.work.mkdir()
        # The archive's machine-id is data: taken only if it is one and no container of
        # this host has it (two would share one journal); else a new identity.
        mid = manifest.machine_id
        new_identity = not (mid and MACHINE_ID.fullmatch(mid)) or _in_use(paths, mid)
        if new_identity:
            _forget_identity(staging)
            mid = uuid.uuid4().hex
        assert mid is not None
        staging.keep_machine_id(mid)
        container.add(paths, config, config_text, layer_from=staging, version=version)
    finally:
        if staging.path.exists():  # add takes it over; not if it failed before
            remove_tree(staging.path)
    return Imported(config, manifest, new_identity)


def _import_full(
    paths: Paths, archive: Path, config: ContainerConfig, manifest: Manifest
) -> Imported:
    """The tree becomes the template template:NAME, and the container a new one on it."""
    try:
        template = parse_image(f"{TEMPLATE}:{config.name.lower()}")
    except ValueError as err:
        raise UsageError(f"NAME: {err}", hint="give a NAME that can name a template") from None
    store = ImageStore(paths.image_dir)
    if store.find(template) is not None:
        raise UsageError(
            f"image {template.image} exists already",
            hint=f"`nspawnctl image remove {template.image}` first, or give another NAME",
        )
    config = dataclasses.replace(config, image=template)
    text = dump_config(config)
    source = Recipe(method="tar", name=template.name, source=str(archive))
    image = store.ensure(source)
    try:
        container.add(paths, config, text)
    except BaseException:
        store.remove(image)
        raise
    return Imported(config, manifest, new_identity=True)


def _refuse_existing(paths: Paths, name: str) -> None:
    config_path = paths.config_file(name)
    if (
        config_path.exists()
        or Layer.of(paths, name).path.exists()
        or container.is_installed(paths, name)
    ):
        raise UsageError(
            f"container {name!r} exists already",
            hint=f"import under another name (`nspawnctl import FILE NEWNAME`), "
            f"or `nspawnctl remove {name}` first",
        )


def _in_use(paths: Paths, machine_id: str) -> bool:
    """Whether another container of this host has this machine-id: two of them would
    share one journal (an export imported beside its original)."""
    layers = Layer.directory(paths)
    return any(
        Layer(path).machine_id == machine_id
        for path in (layers.iterdir() if layers.is_dir() else ())
        if not path.name.startswith(".")
    )


def _forget_identity(layer: Layer) -> None:
    """Leave out the host keys, so that `add` makes new ones (the machine-id it writes
    anew anyway)."""
    for key in layer.tree.names("etc/ssh"):
        if key.startswith("ssh_host_"):
            layer.tree.remove(f"etc/ssh/{key}")


# --- reading an archive -------------------------------------------------------------


def _readable(archive: Path, tmp: Path) -> Path:
    """The archive as Python's tarfile reads it: it reads no zstd (before 3.14)."""
    option, _program = tar.compression(archive)
    if option != "--zstd":
        return archive
    plain = tmp / "archive.tar"
    proc = run(["zstd", "--quiet", "--decompress", "-o", plain, archive], check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise OperationError(
            f"{archive} is damaged: {detail[-1] if detail else 'zstd failed'}", hint=_HINT
        )
    return plain


def _read(readable: Path, archive: Path) -> tuple[Manifest, str]:
    """The manifest and the YAML, after every member has been checked."""
    manifest: Manifest | None = None
    config_text: str | None = None
    has_layer = False
    base = 0  # the uid range the tree's owners are in: a layer's, or 0 for a whole tree
    try:
        with tarfile.open(readable, "r:*") as tar_file:
            for member in tar_file:
                name = _plain_name(member.name)
                if name == METADATA or name.startswith(f"{METADATA}/"):
                    if name == MANIFEST:
                        text = _text(tar_file, member, archive)
                        manifest = Manifest.from_json(text, f"{archive}:{MANIFEST}")
                    elif name == CONFIG:
                        config_text = _text(tar_file, member, archive)
                    continue
                if manifest is None:  # written first, so the rest is judged by it
                    raise _not_an_export(archive)
                if name == UPPER:  # its owner is the guest's root: the range is its
                    base = member.uid // RANGE * RANGE
                problem = _problem(member, name, full=manifest.full, base=base)
                if problem:
                    raise OperationError(
                        f"{archive}: member {member.name!r} {problem}; nothing was imported",
                        hint="nspawnctl writes no such member: this archive was changed "
                        "or made by something else",
                    )
                has_layer = has_layer or name == UPPER
            complete = _ends_as_tar_does(tar_file)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise OperationError(
            f"{archive} is damaged or not a tar archive: {err}", hint=_HINT
        ) from None
    if manifest is None or config_text is None:
        raise _not_an_export(archive)
    if not complete:
        raise OperationError(f"{archive} is damaged: it stops before its end", hint=_HINT)
    if not (manifest.full or has_layer):
        raise OperationError(f"{archive} has no layer ({UPPER}/): it is incomplete", hint=_HINT)
    return manifest, config_text


def _ends_as_tar_does(tar_file: tarfile.TarFile) -> bool:
    """Whether the zero blocks that end every tar archive are there: tarfile takes an
    archive cut off between two members for a whole one."""
    stream = tar_file.fileobj
    assert stream is not None
    stream.seek(tar_file.offset)
    return stream.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)


def _not_an_export(archive: Path) -> OperationError:
    return OperationError(
        f"{archive} is not an nspawnctl export: it does not start with {MANIFEST}",
        hint="an archive of a root filesystem is an image: `nspawnctl image import FILE NAME`",
    )


def _text(tar_file: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> str:
    stream = tar_file.extractfile(member) if member.isfile() else None
    if stream is None or member.size > _MAX_METADATA:
        raise OperationError(f"{archive}: {member.name} is not a small regular file", hint=_HINT)
    try:
        return stream.read().decode("utf-8")
    except UnicodeDecodeError:
        raise OperationError(f"{archive}: {member.name} is not UTF-8 text", hint=_HINT) from None


def _plain_name(name: str) -> str:
    """A member's name without the `./` tar may put before it; "" for the top."""
    while name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name.rstrip("/")


def _problem(member: tarfile.TarInfo, name: str, *, full: bool, base: int) -> str | None:
    """What is wrong with a member of the tree (of a layer, unless `full`), or None.
    `base`: the first uid of the range the guest's files are in."""
    if member.name.startswith("/"):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "has '..' in its path"
    top = "" if full else UPPER
    if not full and name != UPPER and not name.startswith(f"{UPPER}/"):
        return f"is outside the layer ({UPPER}/)"
    if member.islnk():
        target = _plain_name(member.linkname)
        if (
            member.linkname.startswith("/")
            or ".." in PurePosixPath(target).parts
            or not (full or target.startswith(f"{UPPER}/"))
        ):
            return f"is a hard link to {member.linkname!r}, outside the tree"
    if member.issym() and not member.linkname.startswith("/"):
        # Absolute targets are the guest's own paths; a relative one must stay inside.
        inside = posixpath.relpath(name, top) if top else name
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(inside), member.linkname))
        if resolved == ".." or resolved.startswith("../"):
            return f"is a symbolic link to {member.linkname!r}, which leads out of the tree"
    for bit, what, owner in ((stat.S_ISUID, "uid", member.uid), (stat.S_ISGID, "gid", member.gid)):
        if member.mode & bit and not base <= owner < base + RANGE:
            # Not the guest's: set-id to an owner of the host (root, say), which any
            # user who reached the file could run.
            return f"is set-{what} {owner}, outside the container's ids {base}-{base + RANGE - 1}"
    if member.ischr() or member.isblk():
        # In a layer, a character device 0:0 is how overlayfs marks a deleted file.
        whiteout = not full and member.ischr() and (member.devmajor, member.devminor) == (0, 0)
        if not whiteout:
            return "is a device node"
    return None
