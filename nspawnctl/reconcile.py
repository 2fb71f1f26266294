"""Bring an installed container in line with its configuration: what `apply` and `set`
do. A plan is computed first (pure comparison of rendered files with what is on disk),
shown, then carried out all or nothing."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nspawnctl.atomic import write_atomic
from nspawnctl.bus import Systemd
from nspawnctl.config import ContainerConfig, load_config
from nspawnctl.conflicts import check_conflicts, check_host_ports, host_listeners
from nspawnctl.container import (
    image_version,
    installed_lower,
    load_all,
    reload_networkd,
    rendering_for,
    stop_container,
)
from nspawnctl.disk import has_disk, resize
from nspawnctl.disk import size_of as disk_size
from nspawnctl.errors import ConfigError, OperationError
from nspawnctl.guesttree import GuestPathError
from nspawnctl.hold import held
from nspawnctl.install import check_writable, is_ours, remove_file
from nspawnctl.intent import Step, Transaction
from nspawnctl.layers import Layer, digest, record_text
from nspawnctl.log import log
from nspawnctl.names import mount_unit, service_unit, socket_unit
from nspawnctl.paths import Paths
from nspawnctl.render import GENERATED_MARK, host_targets
from nspawnctl.store import ImageStore


@dataclass(frozen=True)
class FileChange:
    path: Path  # on the host; a guest file's path is inside the container's layer
    old: str | None  # None: a new file
    new: str | None  # None: the file goes
    mode: int = 0o644
    owner: int = 0  # a host file's uid and gid (see render.RenderedFile)
    # A guest's file: its path relative to the layer's root, where it is read and
    # written only through the layer's GuestTree (guesttree.py).
    guest: PurePosixPath | None = None

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                (self.old or "").splitlines(keepends=True),
                (self.new or "").splitlines(keepends=True),
                fromfile=str(self.path) if self.old is not None else "/dev/null",
                tofile=str(self.path) if self.new is not None else "/dev/null",
            )
        )


@dataclass(frozen=True)
class Plan:
    paths: Paths
    config: ContainerConfig
    lower: Path  # the image version the container's layer sits on
    changes: tuple[FileChange, ...]
    # Guest files changed in the guest that the YAML says nothing new for: left be.
    kept: tuple[PurePosixPath, ...] = ()
    record: str = ""  # the layer's record of what nspawnctl wrote, once this is done
    # The size the layer's own disk is to get (disk.py); None: it keeps its size.
    disk_size: int | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def changed(self, template: str) -> bool:
        """Whether the host file of this template (see render.host_targets) changes."""
        target = host_targets(self.paths, self.name)[template]
        return any(c.path == target for c in self.changes)

    @property
    def needs_restart(self) -> bool:
        """The container boots with what changed: its guest files, its .nspawn file, its
        service's ExecStart or its mount. The config file, the socket, the host's
        .network file, the SSH keys (read at each connection) and the resource limits
        (applied to the running unit when systemd reloads) need no reboot."""
        quiet = {
            self.config.source,
            *(host_targets(self.paths, self.name)[t] for t in _LIVE_HOST_FILES),
        }
        return any(c.path not in quiet for c in self.changes)


# Host files whose change takes effect without a reboot (see Plan.needs_restart).
_LIVE_HOST_FILES = (
    "container.socket.j2",
    "container.network.j2",
    "authorized_keys.j2",
    "container.resources.conf.j2",
)

# Guest files whose content is the host's fact, not the user's: put back by every apply
# even when changed in the guest. The guest's journald writes to the directory named by
# its /etc/machine-id, and only the one named by the host's ID is bound from the host.
_ALWAYS_PUT_BACK = frozenset({PurePosixPath("etc/machine-id")})

# A file's host path, and for a guest's file its path relative to the layer's root.
_Where = tuple[Path, PurePosixPath | None]


def plan(paths: Paths, config: ContainerConfig, config_text: str) -> Plan:
    """Every file that differs between what `config` renders to and what is installed.
    `config.source` must be the installed config file's path."""
    name = config.name
    installed = _installed_config(paths, name)
    if installed is not None and installed.image.key != config.image.key:
        raise ConfigError(
            config.source,
            "image",
            f"{config.image.image!r}: container {name!r} was made from "
            f"{installed.image.image!r}, and a container's layer cannot move to another image",
            hint=f"`nspawnctl remove {name}` first (export it to keep its data), then apply",
        )
    image = ImageStore(paths.image_dir).find(config.image)
    # An installed container stays on the version it is on (a rollback's, a migrated
    # one's beside the current one): only `image update` moves it on (repoint_users).
    on = installed_lower(paths, name)
    version = on if on is not None and on.is_dir() else None
    rendering = rendering_for(paths, config, image, version=version)
    lower = version or image_version(paths, config, image)
    layer = Layer.of(paths, name)

    def read(path: Path, guest: PurePosixPath | None) -> str | None:
        return _read(path) if guest is None else _read_guest(layer, guest)

    wanted: dict[_Where, tuple[str, int, int]] = {(config.source, None): (config_text, 0o644, 0)}
    for file in rendering.host:
        wanted[Path(file.path), None] = (file.text, file.mode, file.owner)
    for file in rendering.guest:
        wanted[layer.upper / file.path, file.path] = (file.text, file.mode, 0)
    # What an earlier configuration wrote that this one does not (a proxy, the idle
    # timer): judged by rendering the installed configuration, since the guest's own
    # files cannot be told apart from ours by looking at them.
    stale: list[_Where] = [(p, None) for p in host_targets(paths, name).values() if is_ours(p)]
    if installed is not None:
        stale += [
            (layer.upper / f.path, f.path) for f in rendering_for(paths, installed, image).guest
        ]
    # A guest file that differs from what nspawnctl last wrote there was changed in the
    # guest: the user's, as long as the YAML (or nspawnctl) has nothing new for it.
    record = layer.written()
    changes, kept = [], []
    for (path, guest), (text, mode, owner) in wanted.items():
        if (old := read(path, guest)) == text:
            continue
        if (
            guest is not None
            and old is not None
            and record is not None
            and record.get(str(guest)) == digest(text)
            and guest not in _ALWAYS_PUT_BACK
        ):
            kept.append(guest)
            continue
        changes.append(FileChange(path, old, text, mode, owner, guest))
    changes += [
        FileChange(path, old, None, guest=guest)
        for path, guest in dict.fromkeys(stale)
        if (path, guest) not in wanted and (old := read(path, guest)) is not None
    ]
    if installed is not None:
        changes += _retired_keys(layer, installed)
    written = record_text((f.path, f.text) for f in rendering.guest)
    disk_size = _disk_change(config, installed, layer)
    return Plan(paths, config, lower, tuple(changes), tuple(kept), written, disk_size)


def _disk_change(
    config: ContainerConfig, installed: ContainerConfig | None, layer: Layer
) -> int | None:
    """The new size of the layer's own disk, if it changes. Whether a container has a
    disk is fixed when it is made, and so is the disk's inode count."""
    if installed is None or not layer.path.exists():
        return None
    wanted, has = config.resources.disk, has_disk(layer.path)
    if wanted is not None and not has:
        raise ConfigError(
            config.source,
            "resources.disk",
            f"container {config.name!r} was made without a disk of its own; "
            "one is given only when a container is made",
            hint=f"`nspawnctl export {config.name} FILE`, remove it, and import it with this YAML",
        )
    if wanted is None and has:
        raise ConfigError(
            config.source,
            "resources.disk",
            f"container {config.name!r} was made with a disk of its own; it keeps one",
            hint="give its size; to do without, export it, remove it and import it",
        )
    if wanted is None:
        return None
    if config.resources.inodes != installed.resources.inodes:
        raise ConfigError(
            config.source,
            "resources.inodes",
            "is fixed when the container's disk is made",
            hint=f"keep {installed.resources.inodes or 'it unset'}; or export, remove, import",
        )
    return None if disk_size(layer.path) == wanted else wanted


def resize_disk(systemd: Systemd, plan: Plan, verb: str) -> None:
    """Give the layer's own disk its new size: live if it grows; if it shrinks, held
    stopped meanwhile, and refused while the container runs."""
    assert plan.disk_size is not None
    layer = Layer.of(plan.paths, plan.name)
    with held(systemd, plan.paths, plan.name) as running:
        # A running container has its root mounted on the disk; a stopped one only the
        # disk itself, which a shrink unmounts for a moment.
        resize(layer.path, plan.disk_size, running=running)
    log.info(
        "%s: %s: its disk is %s now", plan.name, verb, plan.config.resources.yaml_data()["disk"]
    )


def check_listens(paths: Paths, plan: Plan) -> None:
    """A changed container may not take another container's or the host's ports; the
    addresses it holds already are its own."""
    installed = _installed_config(paths, plan.name)
    own = [listen for _key, listen in installed.listens()] if installed else []
    others, _broken = load_all(paths)
    check_conflicts(plan.config, [c for c in others if c.name != plan.name])
    check_host_ports(
        plan.config, [h for h in host_listeners() if not any(h.listen.overlaps(o) for o in own)]
    )


def carry_out(systemd: Systemd, plan: Plan, *, restart: bool = True, verb: str = "apply") -> bool:
    """Write the plan's files, all or none, and make systemd see them. A running
    container that boots with what changed is powered off first and booted again after
    (unless `restart` is false: then it takes the change at its next boot). Returns
    whether the container was restarted."""
    name, paths = plan.name, plan.paths
    if plan.disk_size is not None:
        resize_disk(systemd, plan, verb)
    if not plan.changes:
        return False
    for change in plan.changes:
        if change.guest is None and change.path != plan.config.source:  # the YAML is the user's
            check_writable(change.path)
    # Held stopped meanwhile (hold.py): a connection that arrives waits, and boots the
    # container once its files are all written, never half-way.
    with held(systemd, paths, name) as running:
        reboot = restart and plan.needs_restart and running
        if reboot:
            log.info("restarting %s: it boots with what changed", name)
            stop_container(systemd, name)
            # The mount too: a changed layer is written while nothing has it mounted.
            systemd.stop(mount_unit(paths.machine_dir(name)))
        layer = Layer.of(paths, name)
        # Recorded before each write: an error takes them back here, a kill -9 has the next
        # nspawnctl take them back (intent.py), so the old files come back, never a mix.
        with Transaction(paths.intent_dir, verb, name, systemd) as transaction:
            transaction.step(Step("reload"))
            for change in plan.changes:
                if change.guest is not None:
                    # Owned by the guest's root, in the layer's uid range (userns.py).
                    base = layer.uid_base
                    relative = str(change.guest)
                    root = str(layer.upper)
                    transaction.step(Step("file", relative, change.old, change.mode, base, root))
                    if change.new is None:
                        layer.tree.remove(change.guest)
                    else:
                        layer.write(change.guest, change.new, change.mode, plan.lower)
                    continue
                step = Step("file", str(change.path), change.old, change.mode, change.owner)
                transaction.step(step)
                if change.new is None:
                    remove_file(change.path)
                else:
                    write_atomic(change.path, change.new, change.mode, change.owner)
            previous = _read(layer.record_file)
            if previous != plan.record:
                transaction.step(Step("file", str(layer.record_file), previous, 0o600))
                write_atomic(layer.record_file, plan.record, 0o600)
            systemd.reload()
            if plan.changed("container.socket.j2"):
                # New addresses are bound by a fresh start of the socket; the guest keeps
                # the sockets it was given until its next boot.
                systemd.stop(socket_unit(name))
                systemd.start(socket_unit(name))
    if plan.changed("container.network.j2"):
        reload_networkd(systemd, name)
    if reboot:
        systemd.start(service_unit(name))
    return reboot


# Where nspawnctl once wrote the YAML's keys: root's own authorized_keys, which
# ssh-copy-id writes too, so that `apply` took the user's keys away. They are now in a
# file of nspawnctl's own (sshd_config.d/nspawnctl.conf).
_OLD_KEYS = PurePosixPath("root/.ssh/authorized_keys")


def without_our_keys(text: str, ours: tuple[str, ...]) -> str | None:
    """An authorized_keys file that nspawnctl once wrote, less what it wrote there (its
    header and the YAML's keys): what the user added stays. None: nothing is left."""
    kept = [
        line
        for line in text.splitlines()
        if not line.startswith(GENERATED_MARK) and line not in ours
    ]
    return "".join(f"{line}\n" for line in kept) or None


def _retired_keys(layer: Layer, installed: ContainerConfig) -> list[FileChange]:
    """The change that takes the YAML's keys out of root's own authorized_keys, where an
    older nspawnctl put them: a key taken out of the YAML must stop working."""
    try:
        old = _read_guest(layer, _OLD_KEYS)
    except GuestPathError:
        return []  # a link or a fifo: the guest's own doing, and not a file of ours
    if old is None or not old.startswith(GENERATED_MARK):
        return []
    new = without_our_keys(old, installed.ssh.authorized_keys)
    return [FileChange(layer.upper / _OLD_KEYS, old, new, 0o600, guest=_OLD_KEYS)]


def _installed_config(paths: Paths, name: str) -> ContainerConfig | None:
    try:
        return load_config(name, paths.config_file(name))
    except ConfigError:
        return None


def _read_guest(layer: Layer, relative: PurePosixPath) -> str | None:
    """A file of the guest's as text, read through its GuestTree (never through a link);
    undecodable bytes are kept visible as replacement characters in a diff."""
    return layer.tree.read_text(relative)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise OperationError(f"cannot read {path}: {err}") from None
