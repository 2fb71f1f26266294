"""A container's life on disk and in systemd: add and remove, each all or nothing."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from nspawnctl.atomic import same_text, write_atomic
from nspawnctl.bus import Systemd, UnitState
from nspawnctl.config import ContainerConfig, load_config
from nspawnctl.conflicts import check_conflicts, check_host_ports, host_listeners
from nspawnctl.errors import ConfigError, OperationError, UsageError
from nspawnctl.events import forget as forget_events
from nspawnctl.faults import checkpoint
from nspawnctl.guesttree import remove_tree
from nspawnctl.hold import open_hold_file
from nspawnctl.install import check_writable, is_ours, remove_file, verify_units
from nspawnctl.intent import Step, Transaction
from nspawnctl.layers import (
    Layer,
    check_upper_filesystem,
    mounted_lower,
    prepare,
    record_text,
    reown_layer,
    used_uid_bases,
)
from nspawnctl.log import log
from nspawnctl.names import gate_unit, lower_unit, mount_unit, service_unit, socket_unit
from nspawnctl.paths import Paths
from nspawnctl.render import MachineState, Rendering, host_targets, render
from nspawnctl.resources import Resources
from nspawnctl.run import run
from nspawnctl.store import Image, ImageStore
from nspawnctl.sysctl import raise_limits
from nspawnctl.userns import (
    allocate,
    allocation_lock,
    check_idmap_support,
    guest_view,
    idmapped_lowers,
    unmount,
    version_of,
)

# What a container is, by its unit's state.
_CONTAINER_STATE = {
    "active": "running",
    "reloading": "running",
    "inactive": "stopped",
    "activating": "booting",
    "deactivating": "stopping",
    "failed": "failed",
}


def container_state(state: UnitState) -> str:
    return _CONTAINER_STATE.get(state.active, state.active)


def config_names(paths: Paths) -> list[str]:
    return sorted(p.stem for p in paths.config_dir.glob("*.yaml") if not p.name.startswith("."))


def load_all(paths: Paths) -> tuple[list[ContainerConfig], list[ConfigError]]:
    """Every container's configuration; a broken file is reported, not fatal."""
    configs, errors = [], []
    for name in config_names(paths):
        try:
            configs.append(load_config(name, paths.config_file(name)))
        except ConfigError as err:
            errors.append(err)
    return configs, errors


def machine_id(paths: Paths, name: str) -> str | None:
    """The container's machine-id, as the host keeps it (never the guest's own file)."""
    return Layer.of(paths, name).machine_id


def units_of(paths: Paths, name: str) -> list[str]:
    """A container's units on the host: its socket, its service, its root's mount, the
    ID-mapped view of its image (with a user namespace)."""
    return [
        socket_unit(name),
        service_unit(name),
        mount_unit(paths.machine_dir(name)),
        lower_unit(name),
        gate_unit(name),
    ]


def is_installed(paths: Paths, name: str) -> bool:
    return any(is_ours(p) for p in host_targets(paths, name).values())


def require_installed(paths: Paths, name: str) -> None:
    if not is_installed(paths, name):
        raise UsageError(f"no container {name!r}", hint="see `nspawnctl list`")


def users_of(paths: Paths, image: Image) -> list[ContainerConfig]:
    configs, _broken = load_all(paths)
    return [c for c in configs if c.image.key == image.key]


def rendering_for(
    paths: Paths,
    config: ContainerConfig,
    image: Image | None = None,
    *,
    known_id: str | None = None,
    uid_base: int | None = None,
    version: Path | None = None,
) -> Rendering:
    """What `add` writes; an existing container keeps its machine-id (or `known_id`, the
    one of a layer not in place yet) and its uid range (or `uid_base`). It goes on the
    image's current version, or on `version`. Without the image at hand, the version it
    would get is shown (v1 if it is not built yet)."""
    if image is None:
        image = ImageStore(paths.image_dir).find(config.image)
    lower = version or image_version(paths, config, image)
    state = MachineState(
        known_id or machine_id(paths, config.name) or uuid.uuid4().hex,
        lower,
        uid_base_for(paths, config) if uid_base is None else uid_base,
    )
    return render(config, paths, state)


def image_version(paths: Paths, config: ContainerConfig, image: Image | None) -> Path:
    """The image version a container is rendered on: its image's current one, or v1 if
    the image is not built yet."""
    return image.current if image else paths.image_dir / config.image.key / "v1"


def installed_uid_base(paths: Paths, name: str) -> int:
    """The uid range the container's layer is in now (0: none, or no layer)."""
    with contextlib.suppress(OSError):
        return Layer.of(paths, name).uid_base
    return 0


def uid_base_for(paths: Paths, config: ContainerConfig, *, keep: Layer | None = None) -> int:
    """Host uid of the container's root: 0 without a user namespace; else the range its
    layer (or the layer `keep` it is about to take) is in, if it has one and no other
    container has it; else a free one."""
    if not config.security.user_namespace:
        return 0
    own = keep or Layer.of(paths, config.name)
    used = used_uid_bases(Layer.directory(paths), but={config.name, own.path.name})
    with contextlib.suppress(OSError):
        if own.uid_base and own.uid_base not in used:
            return own.uid_base
    return allocate(config.name, used)


def installed_lower(paths: Paths, name: str) -> Path | None:
    """The image version the installed mount unit puts the container's root on: the one
    it runs on, or starts on next."""
    try:
        text = host_targets(paths, name)["container.mount.j2"].read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Options="):
            for option in line.removeprefix("Options=").split(","):
                if option.startswith("lowerdir="):
                    return version_of(Path(option.removeprefix("lowerdir=")))
    return None


@contextlib.contextmanager
def merged_view(paths: Paths, name: str, *, upper: Path | None = None) -> Iterator[Path]:
    """A container's whole tree, read-only: its layer stacked over its image. Of a
    stopped container; of a running one only given `upper`, a copy of its layer taken
    by descriptors (guesttree.copy_live), stacked over the image version it runs on: a
    running guest's own tree is never walked by path names, which it can swap."""
    root = paths.machine_dir(name)
    layer = Layer.of(paths, name)
    if not layer.upper.is_dir():
        raise UsageError(f"no container {name!r}", hint="see `nspawnctl list`")
    running_on = mounted_lower(root)
    if running_on is not None and upper is None:
        raise UsageError(f"{name} is running", hint=f"`nspawnctl stop {name}` first")
    config = load_config(name, paths.config_file(name))
    lower = (
        running_on
        or installed_lower(paths, name)
        or ImageStore(paths.image_dir).ensure(config.image).current
    )
    with contextlib.ExitStack() as stack:
        # Owners as the guest sees them: its layer's files are in its uid range on disk.
        shifted = stack.enter_context(guest_view(upper or layer.upper, layer.uid_base))
        view = stack.enter_context(tempfile.TemporaryDirectory(prefix="nspawnctl-view-"))
        run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={shifted}:{lower}", view])
        try:
            yield Path(view)
        finally:
            run(["umount", view])


def check_addable(paths: Paths, config: ContainerConfig) -> None:
    """Whether `add` could install the container here, checked without changing anything:
    its name is free, its addresses are nobody's, its files can be written, systemd runs."""
    name = config.name
    layer = Layer.of(paths, name)
    if is_installed(paths, name) or layer.path.exists():
        raise OperationError(
            f"container {name!r} exists already",
            hint=f"`nspawnctl remove {name}` first, or choose another name",
        )
    root = paths.machine_dir(name)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OperationError(
            f"{root} exists and is not empty: it is not nspawnctl's",
            hint="move it away, or choose another container name",
        )
    others, _broken = load_all(paths)
    check_conflicts(config, others)
    check_host_ports(config, host_listeners())
    check_upper_filesystem(layer.path.parent)
    for path in host_targets(paths, name).values():
        check_writable(path)
    with Systemd.connect():  # no systemd, no work: fail before building or writing anything
        pass


def add(
    paths: Paths,
    config: ContainerConfig,
    config_text: str,
    *,
    layer_from: Layer | None = None,
    version: Path | None = None,
) -> None:
    """Install a container: its layer, its host units, its config; then start its socket.
    On any failure everything done so far is taken back. `layer_from`: a layer to take
    (a restored backup, on the same file system), with its machine-id and host key;
    nspawnctl's own files in it are written anew. `version`: the image version it sits
    on, if not the current one (a layer made on that one)."""
    name = config.name
    layer = Layer.of(paths, name)
    root = paths.machine_dir(name)
    check_addable(paths, config)
    if config.network.mode == "host":
        log.warning("%s shares the host's network: its services bind the host's ports", name)
    config_path = paths.config_file(name)
    # A bootstrap takes minutes: no bus connection is held meanwhile (one held across
    # it was found dead afterwards, "Transport endpoint is not connected").
    image = ImageStore(paths.image_dir).ensure(config.image)
    lower = version or image.current
    with Systemd.connect() as systemd:
        uid_base = uid_base_for(paths, config, keep=layer_from)
        if uid_base:
            check_idmap_support(lower)
        known_id = layer_from.machine_id if layer_from else None
        rendering = rendering_for(
            paths, config, image, known_id=known_id, uid_base=uid_base, version=lower
        )
        verify_units(rendering.host, [socket_unit(name), service_unit(name)])
        # Each step is recorded before it is taken: an error takes them back here, a
        # kill -9 has the next nspawnctl take them back (intent.py).
        with Transaction(paths.intent_dir, "add", name, systemd) as change:
            if not same_text(config_path, config_text):
                previous = config_path.read_text() if config_path.exists() else None
                change.step(Step("file", str(config_path), previous))
                write_atomic(config_path, config_text)
            change.step(Step("tree", str(layer.path)))
            create_layer(
                layer,
                rendering,
                lower,
                name,
                uid_base,
                resources=config.resources,
                base=layer_from,
            )
            if not root.exists():
                change.step(Step("rmdir", str(root)))
                root.mkdir(parents=True)
            change.step(Step("file", str(paths.hold_file(name))))  # its gate needs it
            os.close(open_hold_file(paths, name))
            change.step(Step("reload"))
            for file in rendering.host:
                change.step(Step("file", str(file.path)))  # none of ours was there
                write_atomic(Path(file.path), file.text, file.mode, file.owner)
            systemd.reload()
            change.step(Step("stop", socket_unit(name)))
            systemd.start(socket_unit(name))
        if config.network.gateway is not None:
            reload_networkd(systemd, config.name)
    raise_limits(paths, containers=len(config_names(paths)))
    log.info(
        "added %s: %s listens on %s; the container boots on the first connection",
        name,
        socket_unit(name),
        config.ssh.listen,
    )


def reload_networkd(systemd: Systemd, name: str) -> None:
    """The host side of a static address is systemd-networkd's job."""
    if systemd.states(["systemd-networkd.service"])["systemd-networkd.service"].active != "active":
        log.warning(
            "systemd-networkd does not run on this host: the host side of %s's link "
            "is not configured (systemctl enable --now systemd-networkd)",
            name,
        )
        return
    run(["networkctl", "reload"])


def create_layer(
    layer: Layer,
    rendering: Rendering,
    lower: Path,
    name: str,
    uid_base: int,
    *,
    resources: Resources,
    base: Layer | None = None,
) -> None:
    """The container's own files, in a layer built aside (or in `base`, which this takes
    over, deleting it on failure) and then renamed into place, owned by the container's
    uid range `uid_base` (see userns.py)."""
    staging = base or Layer(layer.path.with_name(f".{name}.new-{os.getpid()}"))
    try:
        if base is None:
            prepare(staging, resources)
            staging.upper.mkdir()
            staging.work.mkdir()
        # Through the layer's GuestTree: a link the guest of a layer taken over planted
        # on any of these paths is refused, never followed to the host's files.
        for file in rendering.guest:
            staging.write(file.path, file.text, file.mode, lower)
        write_atomic(
            staging.record_file, record_text((f.path, f.text) for f in rendering.guest), 0o600
        )
        staging.keep_machine_id(rendering.machine_id)
        if staging.tree.lstat(_HOST_KEY) is None:
            _make_host_key(staging, name, lower)
        with allocation_lock(layer.path.parent):
            # Another `add` may have taken the range since it was chosen.
            if uid_base in used_uid_bases(layer.path.parent, but={name, staging.path.name}):
                raise OperationError(
                    f"uid range {uid_base} was taken by another container meanwhile",
                    hint="run the command again",
                )
            reown_layer(staging, uid_base)
            staging.path.rename(layer.path)
    except BaseException:
        remove_tree(staging.path)
        raise


_HOST_KEY = "etc/ssh/ssh_host_ed25519_key"


def _make_host_key(staging: Layer, name: str, lower: Path) -> None:
    """The guest's SSH host key, made on the host in a private directory and then
    written into the layer like any file of the guest's."""
    base = staging.uid_base  # of a layer taken over: keys for its guest's root
    with tempfile.TemporaryDirectory(prefix="nspawnctl-hostkey-") as tmp:
        key = Path(tmp) / "key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", key])
        for suffix, mode in (("", 0o600), (".pub", 0o644)):
            staging.tree.write(
                _HOST_KEY + suffix,
                Path(f"{key}{suffix}").read_bytes(),
                mode,
                (base, base),
                create=staging.dir_maker(lower),
            )


def remove(paths: Paths, name: str, *, keep_rootfs: bool = False) -> None:
    targets = list(host_targets(paths, name).values())
    layer = Layer.of(paths, name)
    if not has_leftovers(paths, name):
        raise UsageError(f"no container {name!r}", hint="see `nspawnctl list`")
    for path in targets:
        if path.exists() and not is_ours(path):
            raise OperationError(f"refusing to remove {path}: it was not written by nspawnctl")
    options = ("--keep-rootfs",) if keep_rootfs else ()
    # Once begun, a remove can only go forward: if it is killed, the next nspawnctl
    # finishes it (intent.py).
    with (
        Systemd.connect() as systemd,
        Transaction(paths.intent_dir, "remove", name, systemd, forward=True, options=options),
    ):
        _remove(paths, name, systemd, keep_rootfs=keep_rootfs)
    log.info("removed %s%s", name, f" (kept its layer {layer.path})" if keep_rootfs else "")


def has_leftovers(paths: Paths, name: str) -> bool:
    """Whether anything of container `name` is on disk: its config, layer or host files."""
    return (
        paths.config_file(name).exists()
        or Layer.of(paths, name).path.exists()
        or any(p.exists() for p in host_targets(paths, name).values())
    )


def _remove(paths: Paths, name: str, systemd: Systemd, *, keep_rootfs: bool) -> None:
    targets = list(host_targets(paths, name).values())
    config_path = paths.config_file(name)
    layer = Layer.of(paths, name)
    root = paths.machine_dir(name)
    units = units_of(paths, name)
    states = systemd.states(units)
    # The socket first, so that no connection boots the container again meanwhile;
    # the mount last, once nothing runs on it.
    for unit in units:
        if states[unit].load == "loaded":
            systemd.stop_and_forget(unit)
            checkpoint(f"remove: stopped {unit}")
    if systemd.unit_file_state(socket_unit(name)) == "enabled":
        systemd.disable([socket_unit(name)])
    network_file = any(p.suffix == ".network" and p.exists() for p in targets)
    for path in targets:
        remove_file(path)
        checkpoint(f"remove: deleted {path}")
    systemd.reload()
    if network_file:
        reload_networkd(systemd, name)
    if mounted_lower(root) is not None:
        raise OperationError(
            f"{root} is still mounted; its layer is kept",
            hint=f"see `systemctl status {mount_unit(root)}`, then remove again",
        )
    with contextlib.suppress(OSError):  # no layer: nothing was ever mounted for it
        if base := layer.uid_base:
            unmount([lower for lower in idmapped_lowers() if lower.base == base])
    mid = machine_id(paths, name)
    if mid:  # the guest's journal, kept on the host (bound into it by its service)
        journal = paths.journal_dir / mid
        if journal.is_symlink():
            journal.unlink()
        elif journal.is_dir():
            remove_tree(journal)
        checkpoint("remove: deleted the journal")
    if not keep_rootfs:
        remove_tree(layer.path)
        checkpoint("remove: deleted the layer")
        with contextlib.suppress(FileNotFoundError, OSError):
            root.rmdir()
    paths.hold_file(name).unlink(missing_ok=True)
    forget_events(paths, name)
    with contextlib.suppress(FileNotFoundError):
        config_path.unlink()


def is_running(systemd: Systemd, name: str) -> bool:
    service = service_unit(name)
    return systemd.states([service])[service].active in ("active", "activating", "reloading")


def stop_container(systemd: Systemd, name: str) -> None:
    """Power the container off; its socket keeps listening, so the next connection
    boots it again."""
    service = service_unit(name)
    if systemd.states([service])[service].active == "activating":
        # systemd runs ExecStop= (which lets the guest hand accepted connections over
        # cleanly) only for a service that finished starting: let the boot finish.
        systemd.start(service)
    systemd.stop(service)
