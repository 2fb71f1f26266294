"""Snapshots of a container and rolling back to them.

    STATE_DIR/snapshots/NAME/SNAP/upper          a copy of the container's layer (its own files)
    STATE_DIR/snapshots/NAME/SNAP/config.yaml    its NAME.yaml as it was
    STATE_DIR/snapshots/NAME/SNAP/manifest.json  when, and the image version the layer sat on

A snapshot holds what is the container's own, never its image: the image is shared and
read-only, and the manifest names the version the layer sat on. That version stays in
the store for as long as a snapshot names it (see `versions_in_use`), so a rollback after
a bad `image update` puts the container back on the image it had. Exports (export.py)
carry the same manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.atomic import write_atomic
from nspawnctl.bus import Systemd
from nspawnctl.config import ContainerConfig, load_config, load_yaml, parse_config
from nspawnctl.container import (
    add,
    installed_lower,
    is_installed,
    reload_networkd,
    rendering_for,
    uid_base_for,
)
from nspawnctl.errors import OperationError, UsageError
from nspawnctl.faults import checkpoint
from nspawnctl.guesttree import copy_live, copy_tree, delete, remove_tree
from nspawnctl.hold import held
from nspawnctl.install import Undo, check_writable, restore_file, verify_units
from nspawnctl.intent import Intent, Step
from nspawnctl.layers import (
    MACHINE_ID,
    Layer,
    check_upper_filesystem,
    mounted_lower,
    prepare,
    reown_layer,
)
from nspawnctl.log import log
from nspawnctl.names import service_unit, socket_unit
from nspawnctl.paths import Paths
from nspawnctl.recipe import Recipe
from nspawnctl.render import Rendering, host_targets
from nspawnctl.resources import Resources
from nspawnctl.store import ImageStore

FORMAT = 1  # of manifest.json; a reader refuses a newer one
PRE_UPDATE = "pre-update-"  # `image update` names its snapshots pre-update-vN
_SNAPSHOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

# A running container's layer copied while it runs: bounded, as every wait on a guest.
LIVE_COPY_SECONDS = 3600.0


@dataclass(frozen=True)
class Manifest:
    """What a snapshot or an export says of itself."""

    container: str
    created: str  # ISO 8601 with the offset
    recipe: Recipe  # the image's: enough to build it again
    image_version: str | None  # the version (v1, v2...) the layer sat on; None if unknown
    machine_id: str | None
    live: bool  # copied while the container ran (frozen, where the host can freeze)
    full: bool = False  # an export of the whole tree instead of the layer
    format: int = FORMAT

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["image"] = self.recipe.image  # for people reading it; the recipe says it all
        data["image_key"] = self.recipe.key
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format", FORMAT) > FORMAT:
                raise OperationError(
                    f"{where}: format {data['format']} is newer than this nspawnctl reads "
                    f"({FORMAT})",
                    hint="use the nspawnctl that wrote it, or a newer one",
                )
            fields = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in fields}
            data["recipe"] = Recipe.from_json(json.dumps(data["recipe"]))
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise OperationError(
                f"{where}: not a manifest nspawnctl wrote ({type(err).__name__}: {err})"
            ) from None

    @property
    def created_at(self) -> datetime.datetime:
        return datetime.datetime.fromisoformat(self.created)

    def lower(self, paths: Paths) -> Path | None:
        """The image version the layer sat on, if it is still in the store."""
        if self.image_version is None:
            return None
        version = paths.image_dir / self.recipe.key / self.image_version
        return version if version.is_dir() else None


def manifest_of(paths: Paths, config: ContainerConfig, *, live: bool, full: bool) -> Manifest:
    """The manifest of a container now: its image, and the version its layer sits on (the
    one mounted while it runs, else the one its mount unit names)."""
    name = config.name
    lower = mounted_lower(paths.machine_dir(name)) or installed_lower(paths, name)
    return Manifest(
        container=name,
        created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        recipe=config.image,
        image_version=lower.name if lower else None,
        machine_id=Layer.of(paths, name).machine_id,
        live=live,
        full=full,
    )


@dataclass(frozen=True)
class Snapshot:
    container: str
    name: str
    path: Path
    manifest: Manifest

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"


def snapshots_dir(paths: Paths, name: str) -> Path:
    return paths.snapshots_dir / name


def default_name() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def check_snapshot_name(snap: str) -> None:
    if not _SNAPSHOT_RE.match(snap):
        raise UsageError(
            f"{snap!r} is not a snapshot name",
            hint="1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )


def layer_in_use(paths: Paths, name: str) -> bool:
    """Whether the container's layer is in use: its root is mounted while it runs."""
    return mounted_lower(paths.machine_dir(name)) is not None


def require_container(paths: Paths, name: str) -> tuple[ContainerConfig, str]:
    """The container's configuration and its text; its layer must be there."""
    config_path = paths.config_file(name)
    if not Layer.of(paths, name).upper.is_dir() or not config_path.is_file():
        raise UsageError(f"no container {name!r}", hint="see `nspawnctl list`")
    return load_config(name, config_path), config_path.read_text(encoding="utf-8")


def running_error(name: str, what: str) -> UsageError:
    return UsageError(
        f"{name} is running: its layer changes while it is copied",
        hint=f"`nspawnctl stop {name}` first, or `{what} --force` for a copy taken "
        "while it runs (frozen meanwhile, so the copy is of one instant)",
    )


def list_snapshots(paths: Paths, name: str) -> list[Snapshot]:
    """A container's snapshots, oldest first. Its snapshots outlive it: `remove` keeps them."""
    found = []
    directory = snapshots_dir(paths, name)
    for path in sorted(directory.iterdir()) if directory.is_dir() else ():
        if path.name.startswith(".") or not (path / "manifest.json").is_file():
            continue  # one being taken or deleted
        try:
            manifest = Manifest.from_json((path / "manifest.json").read_text(), str(path))
        except OperationError as err:
            log.warning("%s (left out)", err.message)
            continue
        found.append(Snapshot(name, path.name, path, manifest))
    return sorted(found, key=lambda s: s.manifest.created_at)


def get_snapshot(paths: Paths, name: str, snap: str) -> Snapshot:
    check_snapshot_name(snap)
    for snapshot in list_snapshots(paths, name):
        if snapshot.name == snap:
            return snapshot
    raise UsageError(
        f"{name} has no snapshot {snap!r}", hint=f"see `nspawnctl snapshot --list {name}`"
    )


def take(paths: Paths, name: str, snap: str, *, force: bool = False) -> Snapshot:
    """Copy the container's layer and YAML aside. Refused while it runs, unless `force`."""
    check_snapshot_name(snap)
    config, config_text = require_container(paths, name)
    target = snapshots_dir(paths, name) / snap
    if target.exists():
        raise UsageError(
            f"{name} has a snapshot {snap!r} already",
            hint=f"choose another name, or `nspawnctl snapshot --remove {name} {snap}` first",
        )
    # Held: a connection that arrives meanwhile waits, and boots it once the copy is done.
    with Systemd.connect() as systemd, held(systemd, paths, name) as live:
        if live and not force:
            raise running_error(name, f"nspawnctl snapshot {name}")
        checkpoint(f"snapshot: holding {name}")
        return _copy(paths, config, config_text, target, live=live)


def copy_running_layer(paths: Paths, name: str, target: Path, *, frozen: bool = True) -> None:
    """A copy of a running container's layer, taken while the container is frozen, so
    that it is of one instant (a database's files and its log agree); its connections
    wait meanwhile, in the host's queue. Where the host cannot freeze it (no unified
    cgroup hierarchy) the copy is taken all the same, consistent file by file only, and
    says so. Not `frozen`: consistent file by file, for a first pass that a copy of the
    stopped container corrects. The guest renames and swaps files meanwhile: a
    path-walking cp could be led through a link it swaps in, so copy_live goes by
    descriptors only."""
    with _frozen(paths, name) if frozen else contextlib.nullcontext():
        copy_live(
            Layer.of(paths, name).upper, target, deadline=time.monotonic() + LIVE_COPY_SECONDS
        )


@contextlib.contextmanager
def _frozen(paths: Paths, name: str) -> Iterator[None]:
    """The container frozen for the body, and thawed after it whatever happened: a
    freeze that failed or timed out may still be under way in systemd."""
    service = service_unit(name)
    # Recorded before the freeze: if nspawnctl is killed while the container is
    # frozen, the next nspawnctl thaws it (recovery.py).
    record = Intent(paths.intent_dir, "freeze", name)
    record.add(Step("thaw", service))
    checkpoint(f"freeze: thaw of {name} recorded")
    try:
        with Systemd.connect() as systemd:
            try:
                systemd.freeze(service)
                checkpoint(f"freeze: {name} frozen")
            except OperationError as err:
                log.warning(
                    "%s cannot be frozen (%s): the copy is consistent file by file, "
                    "not of one instant",
                    name,
                    err.message,
                )
        yield
    except BaseException:
        _thaw(record, service)
        raise
    problem = _thaw(record, service)
    if problem:
        raise OperationError(
            f"{name} was copied, but stays frozen: {problem}",
            hint=f"`systemctl thaw {service}`; the next nspawnctl command tries again",
        )


def _thaw(record: Intent, service: str) -> str | None:
    """Thaw on a connection of its own (the one that froze may be an hour old and
    broken); the record is kept if it fails, so that the next nspawnctl tries again.
    Returns what went wrong, if anything."""
    try:
        with Systemd.connect() as systemd:
            systemd.thaw(service)
    except OperationError as err:
        log.error("%s stays frozen: %s", service, err.message)
        record.close()
        return err.message
    record.done()
    return None


def _copy(
    paths: Paths, config: ContainerConfig, config_text: str, target: Path, *, live: bool
) -> Snapshot:
    name = config.name
    manifest = manifest_of(paths, config, live=live, full=False)
    # A layer's whiteouts (character devices 0:0) cannot be made on overlayfs.
    check_upper_filesystem(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.new-{os.getpid()}")
    try:
        staging.mkdir(mode=0o700)  # a copy of a guest's files: root's business only
        upper = Layer.of(paths, name).upper
        if live:
            copy_running_layer(paths, name, staging / "upper")
        else:
            # A reflink copy where the file system has them (Btrfs, XFS): nearly free.
            copy_tree(upper, staging / "upper")
        write_atomic(staging / "config.yaml", config_text, 0o600)
        write_atomic(staging / "manifest.json", manifest.to_json(), 0o600)
        if not live and layer_in_use(paths, name):
            # A connection booted it while we copied: the copy may be torn.
            raise OperationError(
                f"{name} started while its snapshot was taken; nothing was kept",
                hint="try again, or stop its socket meanwhile",
            )
        if target.exists():  # replacing one of ours (pre-update snapshots)
            remove_tree(target)
        staging.rename(target)
    except BaseException:
        delete(staging)
        raise
    return Snapshot(name, target.name, target, manifest)


def remove_snapshot(paths: Paths, name: str, snap: str) -> None:
    remove_tree(get_snapshot(paths, name, snap).path)
    with contextlib.suppress(OSError):
        snapshots_dir(paths, name).rmdir()  # the last one


def versions_in_use(paths: Paths) -> set[Path]:
    """Every image version a snapshot sat on: `image update` keeps them, so that a
    rollback can go back to them."""
    root = paths.snapshots_dir
    found = set()
    for container in root.iterdir() if root.is_dir() else ():
        for snapshot in list_snapshots(paths, container.name):
            version = snapshot.manifest.lower(paths)
            if version is not None:
                found.add(version)
    return found


# --- image update -------------------------------------------------------------------


def before_update(paths: Paths, names: Iterable[str], version: str) -> list[Snapshot]:
    """A snapshot pre-update-VERSION of each container, taken before `image update`
    makes VERSION: a running container's while it runs (its layer does not change
    with the image, so this is the only moment to take it)."""
    taken: list[Snapshot] = []
    try:
        for name in names:
            if not Layer.of(paths, name).upper.is_dir():
                continue  # not installed: nothing to keep
            config, text = require_container(paths, name)
            target = snapshots_dir(paths, name) / f"{PRE_UPDATE}{version}"
            # Held, as `snapshot` holds it: one copy of a container at a time. A bus
            # connection of its own for each: a copy may take long, and one connection
            # kept idle across them all may be dropped by the bus meanwhile.
            with Systemd.connect() as systemd, held(systemd, paths, name) as live:
                taken.append(_copy(paths, config, text, target, live=live))
    except BaseException:
        discard(taken)
        raise
    return taken


def discard(snapshots: Iterable[Snapshot]) -> None:
    for snapshot in snapshots:
        remove_tree(snapshot.path)


def drop_earlier(paths: Paths, kept: Iterable[Snapshot]) -> list[Snapshot]:
    """Delete each container's earlier pre-update snapshots: only the last update is
    kept undoable, so that an image keeps at most one old version for them."""
    dropped = []
    for snapshot in kept:
        for other in list_snapshots(paths, snapshot.container):
            if other.name.startswith(PRE_UPDATE) and other.name != snapshot.name:
                remove_tree(other.path)
                dropped.append(other)
    return dropped


# --- rollback -----------------------------------------------------------------------


def rollback(paths: Paths, name: str, snap: str) -> Path:
    """Put the snapshot's layer and YAML in place of the container's, all or nothing, and
    its units back as they were for them. The container must be stopped; a container
    that was removed is added again. Returns the image version it now sits on."""
    snapshot = get_snapshot(paths, name, snap)
    config_path = paths.config_file(name)
    config_text = snapshot.config.read_text(encoding="utf-8")
    config = parse_config(name, load_yaml(config_text, snapshot.config), snapshot.config)
    config = dataclasses.replace(config, source=config_path)
    staging = Layer(Layer.of(paths, name).path.with_name(f".{name}.rollback-{os.getpid()}"))
    store = ImageStore(paths.image_dir)
    try:
        if not is_installed(paths, name) and not Layer.of(paths, name).path.exists():
            _copy_layer(snapshot, staging, config.resources)
            add(paths, config, config_text, layer_from=staging)
            image = store.find(config.image)
            assert image is not None  # add has built it
            return image.current
        if layer_in_use(paths, name):
            raise UsageError(f"{name} is running", hint=f"`nspawnctl stop {name}` first")
        lower = snapshot.manifest.lower(paths)
        if lower is None or snapshot.manifest.recipe.key != config.image.key:
            lower = store.ensure(config.image).current
            log.warning(
                "%s's image version %s is no longer in the store: %s goes back on %s",
                snap,
                snapshot.manifest.image_version or "(unknown)",
                name,
                lower.name,
            )
        # Only the host's files are used: the guest's are in the snapshot's layer, which
        # goes into the uid range the units name (the container's own, normally the one
        # it had at the snapshot; not if `security.user_namespace` changed since).
        uid_base = uid_base_for(paths, config)
        rendering = rendering_for(
            paths, config, known_id=snapshot.manifest.machine_id, version=lower, uid_base=uid_base
        )
        verify_units(rendering.host, [socket_unit(name), service_unit(name)])
        for path in host_targets(paths, name).values():
            check_writable(path)
        _copy_layer(snapshot, staging, config.resources)
        reown_layer(staging, uid_base)
        with Systemd.connect() as systemd:
            _swap(
                paths,
                systemd,
                config=config,
                config_text=config_text,
                rendering=rendering,
                staging=staging,
            )
    finally:
        if staging.path.exists():
            remove_tree(staging.path)
    return lower


def _copy_layer(snapshot: Snapshot, staging: Layer, resources: Resources) -> None:
    prepare(staging, resources)  # on a disk of its own, if the snapshot's YAML gives one
    copy_tree(snapshot.upper, staging.upper)
    staging.work.mkdir()
    # The identity the host kept when the snapshot was taken (checked again: a snapshot
    # from before the host kept it holds what its guest wrote); a new one if none.
    mid = snapshot.manifest.machine_id
    staging.keep_machine_id(mid if mid and MACHINE_ID.fullmatch(mid) else uuid.uuid4().hex)


def _swap(
    paths: Paths,
    systemd: Systemd,
    *,
    config: ContainerConfig,
    config_text: str,
    rendering: Rendering,
    staging: Layer,
) -> None:
    """The exchange itself. The container is held stopped meanwhile (hold.py): its
    socket keeps listening, and a connection that arrives waits for the swap to end,
    then boots the container on the layer it is given."""
    name = config.name
    layer = Layer.of(paths, name)
    with held(systemd, paths, name) as running:
        if running:
            raise UsageError(f"{name} is running", hint=f"`nspawnctl stop {name}` first")
        old = Layer(layer.path.with_name(f".{name}.old-{os.getpid()}"))
        undo = Undo()
        with undo.guard():
            if layer.path.exists():  # not if a failed `add` or `remove` left none
                layer.path.rename(old.path)
                undo.push("layer", lambda: os.rename(old.path, layer.path))
            staging.path.rename(layer.path)
            undo.push("snapshot's layer", lambda: os.rename(layer.path, staging.path))
            undo.push("daemon-reload", systemd.reload)
            changed = _put_back(paths.config_file(name), config_text, 0o644, undo)
            network = False
            for path in host_targets(paths, name).values():
                file = next((f for f in rendering.host if Path(f.path) == path), None)
                text = file.text if file else None
                mode, owner = (file.mode, file.owner) if file else (0o644, 0)
                if _put_back(path, text, mode, undo, owner):
                    changed = True
                    network = network or path.suffix == ".network"
            if changed:
                systemd.reload()
        remove_tree(old.path)
        if network:
            reload_networkd(systemd, name)


def _put_back(path: Path, text: str | None, mode: int, undo: Undo, owner: int = 0) -> bool:
    """Make `path` hold `text` (None: not be there) with `mode` and `owner`; remember
    how to undo it. Only files nspawnctl wrote are removed. Returns whether anything
    changed."""
    try:
        previous: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        previous = None
    if previous == text:
        return False
    if text is None:
        path.unlink()
    else:
        write_atomic(path, text, mode, owner)
    undo.push(str(path), lambda: restore_file(path, previous, mode, owner))
    return True
