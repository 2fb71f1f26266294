"""`nspawnctl migrate NAME --to HOST`: a container moved, with its data, to another host's
nspawnctl over ssh (ssh.py), as OpenVZ's vzmigrate moves one.

It is built of what each side already does whole: `export` of the layer here, `import`
there (all or nothing), `remove` here. In order:
1. ask, changing nothing: the far nspawnctl's version; that NAME is free there and its
   addresses too (`add --check`); that the image version the layer sits on is there,
   the very one (by its digest, version_digest: not by name), current or not. If the
   far store lacks it, it is sent there, beside the versions it has (a cache: nothing
   to take back), and the layer is imported onto it there;
2. a running container's layer is exported and sent while it runs (not frozen: a
   first pass), with rsync if both hosts have it;
3. close the socket here (a connection is refused, not booted here), power the
   container off, export its layer;
4. send the archive (rsync: only what differs from the first pass), check its digest
   there, import it: the socket listens there;
5. remove it here (or keep it stopped, --keep).
Its record (intent.py) is written before step 3. Until step 4 has begun, a failure
opens the socket here again, as if nothing happened. From then on the far side may
have it: nothing here is taken back or removed on a guess. A cut connection, or a kill
anywhere, leaves the record, the container stopped and whole here, and perhaps whole
there too, listening; running `migrate` again finishes (it is there, with this machine-id:
remove it here) or starts again (it is not), and `migrate --abort` opens it here again."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nspawnctl import container, export
from nspawnctl.backup import require_container
from nspawnctl.bootstrap import tar
from nspawnctl.bus import Systemd
from nspawnctl.errors import OperationError, UsageError
from nspawnctl.faults import checkpoint
from nspawnctl.intent import Intent
from nspawnctl.layers import Layer, mounted_lower
from nspawnctl.log import log
from nspawnctl.names import service_unit, socket_unit
from nspawnctl.paths import Paths
from nspawnctl.ssh import Connection, Destination, Sent, connected
from nspawnctl.store import version_digest

VERB = "migrate"


@dataclass(frozen=True)
class Moved:
    name: str
    destination: Destination
    closed_seconds: float  # from closing the socket here to its listening there
    finished_only: bool  # an earlier, interrupted migrate had done the copy


def pending(paths: Paths, name: str) -> Path | None:
    """The record of a migrate of NAME that was cut short, if there is one."""
    path = paths.intent_dir / f"{VERB}-{name}.json"
    return path if path.exists() else None


def migrate(
    paths: Paths, name: str, destination: Destination, *, keep: bool, cold: bool = False
) -> Moved:
    """`cold`: a running container is stopped before its layer is copied, not copied
    while it runs first (for a layer that changes faster than it can be sent)."""
    _config, config_text = require_container(paths, name)
    layer = Layer.of(paths, name)
    machine_id = layer.machine_id
    with connected(destination) as far:
        far.check_version()
        there = _status(far, name)
        if there is not None:
            if pending(paths, name) and machine_id and there.get("machine_id") == machine_id:
                # An earlier migrate got it there whole: only this side is left to do,
                # unless it ran here since (a reboot, a start): then what it wrote here
                # is not there, and removing it here would lose it.
                with Systemd.connect() as systemd:
                    if not _quiet(systemd, name):
                        raise OperationError(
                            f"{name} runs or listens here again since its migrate was cut "
                            f"short, and {destination} has a copy of it",
                            hint=f"keep one: `nspawnctl migrate --abort {name}` and remove it "
                            f"there, or stop it here and run this again",
                        )
                if _was_enabled(pending(paths, name)):
                    far.call(["enable", name])
                _finish(paths, name, keep)
                return Moved(name, destination, 0.0, finished_only=True)
            raise UsageError(
                f"{destination} has a container {name!r} already",
                hint=f"remove it there first, or `nspawnctl -H {destination} list`",
            )
        # Beside the layers, not in /tmp (often a small tmpfs): the archive is as big
        # as the layer.
        paths.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".migrate-", dir=paths.state_dir) as tmp:
            yaml = Path(tmp) / f"{name}.yaml"
            yaml.write_text(config_text)
            far.call(["add", "--check", name, "-f", str(yaml)], [Sent(yaml, "0.yaml", "input")])
            missing, digest = _missing_image(paths, far, name)
            if missing is not None:
                _send_image(far, missing, digest, Path(tmp))
            checkpoint(f"migrate: {name} checked")
            return _move(paths, name, far, Path(tmp), Plan(keep, cold, digest))


@dataclass(frozen=True)
class Plan:
    keep: bool  # here, stopped, afterwards
    cold: bool  # no copy while it runs
    image_digest: str  # of the image version its layer sits on, which the far host has


def _move(paths: Paths, name: str, far: Connection, tmp: Path, plan: Plan) -> Moved:
    socket = socket_unit(name)
    with Systemd.connect() as systemd:
        # An earlier migrate cut short disabled it, and its record says it was enabled.
        enabled = systemd.unit_file_state(socket) == "enabled" or _was_enabled(pending(paths, name))
        running = container.is_running(systemd, name)
    with contextlib.ExitStack() as stack:
        # A running container is copied while it runs, and then only what changed travels
        # while it is stopped: a plain .tar, whose unchanged files are the same bytes in
        # both passes (tar --sort=name), for rsync to find. Without rsync on both sides,
        # the whole layer goes while it is stopped, compressed.
        precopy = (
            running and not plan.cold and shutil.which("rsync") is not None and far.has("rsync")
        )
        archive = tmp / (f"{name}.tar" if precopy else f"{name}.tar.zst")
        remote = None
        if precopy:
            remote = f"{stack.enter_context(far.scratch())}/0.tar"
            export.export(paths, name, archive, full=False, force=True, draft=True)
            went = far.sync(archive, remote)
            archive.unlink()  # rsync's basis is the copy there: no room for two here
            log.info("%s: copied while it runs (%s sent)", name, _size(went))
            checkpoint(f"migrate: {name} copied while running")
        return _cut_over(paths, name, far, archive, remote, enabled=enabled, plan=plan)


def _cut_over(
    paths: Paths,
    name: str,
    far: Connection,
    archive: Path,
    remote: str | None,
    *,
    enabled: bool,
    plan: Plan,
) -> Moved:
    """Closed and stopped here, its layer exported and sent (to `remote`, which holds a
    copy taken while it ran: only the difference travels), imported there, listening."""
    # "enabled": migrate disables it meanwhile, and taking back enables it again.
    options = (str(far.destination), *(("enabled",) if enabled else ()))
    record = Intent(paths.intent_dir, VERB, name, options=options)
    started = time.monotonic()
    sent = False  # from here on the far side may have it: nothing is taken back
    try:
        _close_and_stop(name, enabled=enabled)
        export.export(paths, name, archive, full=False, force=False)
        checkpoint(f"migrate: {name} exported")
        sent = True
        _send_and_import(far, name, archive, remote, plan.image_digest)
        checkpoint(f"migrate: {name} imported there")
        if enabled:
            far.call(["enable", name])
        there = _status(far, name)
        # "running": a connection has booted it there already.
        if there is None or there["socket"]["state"] not in ("listening", "running"):
            state = there["socket"]["state"] if there else "missing"
            raise OperationError(f"{far.destination}: {name}'s socket is {state} there")
        closed = time.monotonic() - started
        _finish(paths, name, plan.keep)
    except BaseException:
        if sent:
            record.close()  # kept: migrate again to finish, or --abort
            log.error(
                "%s is stopped here and may be on %s already: run this migrate again to "
                "finish it, or `nspawnctl migrate --abort %s` to listen here again",
                name,
                far.destination,
                name,
            )
            raise
        _reopen(name, record.path)
        record.done()
        raise
    record.done()
    return Moved(name, far.destination, closed, finished_only=False)


def _close_and_stop(name: str, *, enabled: bool) -> None:
    """Its socket closed (a connection is refused, not booted here) and disabled (a
    reboot meanwhile must not open it here again), the container powered off."""
    socket = socket_unit(name)
    with Systemd.connect() as systemd:
        if enabled:
            systemd.disable([socket])
            systemd.reload()
        systemd.stop(socket)
        checkpoint(f"migrate: {name}'s socket closed")
        container.stop_container(systemd, name)
        # A boot under way when the socket closed is let finish and then stopped, and may
        # start the socket again: closed again, and both must stay so now.
        systemd.stop(socket)
        if not _quiet(systemd, name):
            raise OperationError(f"{name} started again here while it was being stopped")


def _send_and_import(
    far: Connection, name: str, archive: Path, remote: str | None, image_digest: str
) -> None:
    """The archive there, checked against its digest, and imported (all or nothing) on
    the image version of `image_digest` there."""
    digest = _sha256(archive)
    with contextlib.ExitStack() as stack:
        if remote is None:
            where = stack.enter_context(far.sent([Sent(archive, "0.tar.zst", "input")]))
        else:
            went = far.sync(archive, remote)
            log.info("%s: what changed meanwhile sent (%s)", name, _size(went))
            where = {str(archive): remote}
        checked = far.run(shlex.join(["sha256sum", "--", where[str(archive)]]), what="checking")
        if checked.returncode != 0:
            raise far.failed(checked)
        if checked.stdout.decode(errors="replace").split()[:1] != [digest]:
            raise OperationError(
                f"{far.destination}: the archive of {name} arrived damaged",
                hint="run `nspawnctl migrate` again",
            )
        checkpoint(f"migrate: {name} sent")
        far.call_sent(["import", str(archive), "--image-digest", image_digest], where)


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MB"


def _finish(paths: Paths, name: str, keep: bool) -> None:
    """It listens there: here it is removed, or kept stopped and not listening."""
    checkpoint(f"migrate: finishing {name} here")
    if keep:
        with Systemd.connect() as systemd:
            systemd.stop(socket_unit(name))
            systemd.disable([socket_unit(name)])
    else:
        container.remove(paths, name)
    path = pending(paths, name)
    if path is not None:
        path.unlink(missing_ok=True)


def abort(paths: Paths, name: str) -> None:
    """A migrate cut short, taken back here: the socket listens again. The far host may
    have a copy of it, which this side cannot know: the caller says so."""
    path = pending(paths, name)
    if path is None:
        raise UsageError(f"no migrate of {name} to take back")
    with open(path, "rb") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"the migrate of {name} is still running", hint="wait for it, or stop it first"
            ) from None
        if container.is_installed(paths, name):
            _reopen(name, path)
        path.unlink(missing_ok=True)  # a container removed meanwhile: nothing to reopen


def _reopen(name: str, record: Path | None = None) -> None:
    """The socket here listens again, and is enabled again if migrate disabled it."""
    with contextlib.suppress(OperationError), Systemd.connect() as systemd:
        if _was_enabled(record):
            systemd.enable([socket_unit(name)])
            systemd.reload()
        systemd.start(socket_unit(name))


def _was_enabled(record: Path | None) -> bool:
    """Whether the record of a migrate says its socket was enabled before it began."""
    if record is None:
        return False
    try:
        options = json.loads(record.read_text()).get("options") or []
    except (OSError, ValueError, AttributeError):
        return False
    return "enabled" in options


def _quiet(systemd: Systemd, name: str) -> bool:
    """Neither its socket nor its container is active or starting here."""
    units = [socket_unit(name), service_unit(name)]
    return all(s.active in ("inactive", "failed") for s in systemd.states(units).values())


def _status(far: Connection, name: str) -> dict[str, Any] | None:
    """The far side's `status NAME --json`, or None if it has no such container."""
    # `list` exits 1 when some other YAML there is broken: its rows still count.
    rows, _other = far.ask(["list", "--json"])
    if name not in {row["name"] for row in rows}:
        return None
    status: dict[str, Any] = json.loads(far.call(["status", name, "--json"]))
    return status


def _missing_image(paths: Paths, far: Connection, name: str) -> tuple[Path | None, str]:
    """The layer is a difference against one exact image version, which must be there,
    by content (version_digest, not by name). (the version to send, or None if the far
    store has it; its digest)."""
    config, _text = require_container(paths, name)
    version = mounted_lower(paths.machine_dir(name)) or container.installed_lower(paths, name)
    if version is None:
        raise OperationError(f"{name}: the image version its layer sits on is not here")
    ours = version_digest(version)
    images = json.loads(far.call(["image", "list", "--json", "--digest"]))
    theirs = next((i for i in images if i["key"] == config.image.key), None)
    if theirs is not None and ours in theirs.get("versions", {}).values():
        return None, ours
    if theirs is not None:
        # Beside its current version, not instead of it: what the other containers there
        # start on next is an `image update` of that host, not this verb's to change.
        log.info(
            "%s has another version (%s) of %s: sending %s's beside it",
            far.destination,
            theirs["version"],
            config.image.image,
            name,
        )
    return version, ours


def _send_image(far: Connection, version: Path, digest: str, tmp: Path) -> None:
    """The image version goes to the far store under its own recipe and key (beside the
    versions it has there), checked there against its digest. While the container still
    runs here: an image is only a cache there, and a migrate that stops later leaves it
    for the next one."""
    recipe = version.parent / "recipe.json"
    archive = tmp / "image.tar.zst"
    tar.create(archive, [(version, ["."])])
    log.info(
        "%s lacks this version of image %s: sending it (%s)",
        far.destination,
        version.parent.name,
        _size(archive.stat().st_size),
    )
    verb = ["image", "import", str(archive), "--recipe", str(recipe)]
    verb += ["--digest", digest]
    far.call(verb, [Sent(archive, "image.tar.zst", "input"), Sent(recipe, "recipe.json", "input")])
    archive.unlink()
    checkpoint(f"migrate: image {version.parent.name} sent")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
