"""A container's life on disk and in systemd: add and remove, each all or nothing."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from nspawnctl.bus import Systemd
from nspawnctl.config import ContainerConfig, check_conflicts, load_config
from nspawnctl.errors import ConfigError, NspawnctlError, OperationError, UsageError
from nspawnctl.install import (
    Undo,
    check_writable,
    is_ours,
    remove_file,
    remove_tree,
    verify_units,
    write_atomic,
)
from nspawnctl.layers import Layer, check_upper_filesystem, mounted_lower
from nspawnctl.log import log
from nspawnctl.names import mount_unit, service_unit, socket_unit
from nspawnctl.paths import Paths
from nspawnctl.ports import check_host_ports, host_listeners
from nspawnctl.render import MachineState, Rendering, host_targets, render
from nspawnctl.run import run
from nspawnctl.store import Image, ImageStore


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
    """The container's own machine-id; it lives in its layer, so no mount is needed."""
    try:
        text = (Layer.of(paths, name).upper / "etc/machine-id").read_text().strip()
    except OSError:
        return None
    return text or None


def units_of(paths: Paths, name: str) -> list[str]:
    """A container's units on the host: its socket, its service, its root's mount."""
    return [socket_unit(name), service_unit(name), mount_unit(paths.machine_dir(name))]


def is_installed(paths: Paths, name: str) -> bool:
    return any(is_ours(p) for p in host_targets(paths, name).values())


def users_of(paths: Paths, image: Image) -> list[ContainerConfig]:
    configs, _broken = load_all(paths)
    return [c for c in configs if c.image.key == image.key]


def rendering_for(paths: Paths, config: ContainerConfig, image: Image | None = None) -> Rendering:
    """What `add` writes; an existing container keeps its machine-id. Without the image
    at hand, the version it would get is shown (v1 if it is not built yet)."""
    if image is None:
        image = ImageStore(paths.image_dir).find(config.image)
    lower = image.current if image else paths.image_dir / config.image.key / "v1"
    state = MachineState(machine_id(paths, config.name) or uuid.uuid4().hex, lower)
    return render(config, paths, state)


def add(paths: Paths, config: ContainerConfig, config_text: str) -> None:
    """Install a container: its layer, its host units, its config; then start its socket.
    On any failure everything done so far is taken back."""
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
    if config.network.mode == "host":
        log.warning("%s shares the host's network: its services bind the host's ports", name)
    for path in host_targets(paths, name).values():
        check_writable(path)

    config_path = paths.config_file(name)
    with Systemd.connect() as systemd:  # no systemd, no work: fail before writing anything
        image = ImageStore(paths.image_dir).ensure(config.image)
        rendering = rendering_for(paths, config, image)
        verify_units(rendering.host, [socket_unit(name), service_unit(name)])
        undo = Undo()
        with undo.guard():
            if not _same_text(config_path, config_text):
                previous = config_path.read_text() if config_path.exists() else None
                write_atomic(config_path, config_text)
                undo.push("config", lambda: _restore(config_path, previous))
            create_layer(layer, rendering, image.current, name)
            undo.push("layer", lambda: remove_tree(layer.path))
            if not root.exists():
                root.mkdir(parents=True)
                undo.push("mount point", root.rmdir)
            undo.push("daemon-reload", systemd.reload)
            for file in rendering.host:
                write_atomic(Path(file.path), file.text, file.mode)
                undo.push(str(file.path), lambda p=Path(file.path): remove_file(p))  # type: ignore[misc]
            systemd.reload()
            undo.push("socket", lambda: _stop_and_forget(systemd, socket_unit(name)))
            systemd.start(socket_unit(name))
        if config.network.gateway is not None:
            _reload_networkd(systemd, config.name)
    log.info(
        "added %s: %s listens on %s; the container boots on the first connection",
        name,
        socket_unit(name),
        config.ssh.listen,
    )


def _reload_networkd(systemd: Systemd, name: str) -> None:
    """The host side of a static address is systemd-networkd's job."""
    if systemd.states(["systemd-networkd.service"])["systemd-networkd.service"].active != "active":
        log.warning(
            "systemd-networkd does not run on this host: the host side of %s's link "
            "is not configured (systemctl enable --now systemd-networkd)",
            name,
        )
        return
    run(["networkctl", "reload"])


def create_layer(layer: Layer, rendering: Rendering, lower: Path, name: str) -> None:
    """The container's own files, in a layer built aside and then renamed into place."""
    staging = Layer(layer.path.with_name(f".{name}.new-{os.getpid()}"))
    try:
        staging.upper.mkdir(parents=True)
        staging.work.mkdir()
        for file in rendering.guest:
            directory = staging.make_dirs(Path(file.path).parent, lower)
            write_atomic(directory / file.path.name, file.text, file.mode)
        staging.make_dirs(Path("etc/ssh"), lower)
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"root@{name}",
                "-f",
                staging.upper / "etc/ssh/ssh_host_ed25519_key",
            ]
        )
        staging.path.rename(layer.path)
    except BaseException:
        remove_tree(staging.path)
        raise


def remove(paths: Paths, name: str, *, keep_rootfs: bool = False) -> None:
    targets = list(host_targets(paths, name).values())
    config_path = paths.config_file(name)
    layer = Layer.of(paths, name)
    root = paths.machine_dir(name)
    if not (config_path.exists() or layer.path.exists() or any(p.exists() for p in targets)):
        raise UsageError(f"no container {name!r}", hint="see `nspawnctl list`")
    for path in targets:
        if path.exists() and not is_ours(path):
            raise OperationError(f"refusing to remove {path}: it was not written by nspawnctl")
    with Systemd.connect() as systemd:
        units = units_of(paths, name)
        states = systemd.states(units)
        # The socket first, so that no connection boots the container again meanwhile;
        # the mount last, once nothing runs on it.
        for unit in units:
            if states[unit].load == "loaded":
                _stop_and_forget(systemd, unit)
        if systemd.unit_file_state(socket_unit(name)) == "enabled":
            systemd.disable([socket_unit(name)])
        network_file = any(p.suffix == ".network" and p.exists() for p in targets)
        for path in targets:
            remove_file(path)
        systemd.reload()
        if network_file:
            _reload_networkd(systemd, name)
    if mounted_lower(root) is not None:
        raise OperationError(
            f"{root} is still mounted; its layer is kept",
            hint=f"see `systemctl status {mount_unit(root)}`, then remove again",
        )
    mid = machine_id(paths, name)
    if mid:  # the guest's journal, kept on the host by systemd-nspawn --link-journal=try-host
        journal = paths.journal_dir / mid
        if journal.is_symlink():
            journal.unlink()
        elif journal.is_dir():
            remove_tree(journal)
    if not keep_rootfs:
        remove_tree(layer.path)
        with contextlib.suppress(FileNotFoundError, OSError):
            root.rmdir()
    with contextlib.suppress(FileNotFoundError):
        config_path.unlink()
    log.info("removed %s%s", name, f" (kept its layer {layer.path})" if keep_rootfs else "")


def _stop_and_forget(systemd: Systemd, unit: str) -> None:
    """Stop a unit and clear a failed state, so that systemd keeps no trace of it once
    its file is gone. Best effort: this runs while undoing or removing."""
    try:
        systemd.stop(unit)
        systemd.reset_failed(unit)
    except NspawnctlError as err:
        log.debug("stopping %s: %s", unit, err)


def _same_text(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


def _restore(path: Path, previous: str | None) -> None:
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, previous)
