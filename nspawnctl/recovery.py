"""Settling changes that a killed nspawnctl left half-done (see intent.py)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from nspawnctl import container, migrate
from nspawnctl.bus import Systemd
from nspawnctl.errors import NspawnctlError
from nspawnctl.guesttree import remove_tree
from nspawnctl.intent import Record, abandoned, take_back
from nspawnctl.layers import attach_disks
from nspawnctl.log import log
from nspawnctl.paths import Paths, make_private
from nspawnctl.store import ImageStore
from nspawnctl.update import repoint_users


def settle(paths: Paths) -> list[str]:
    """Finish or take back every change whose nspawnctl was killed; say what was done.
    First of all, the state directory is made private, as it must be before anything
    of a guest's is put there."""
    make_private(paths)
    directory = paths.intent_dir
    settled = []
    for path, record in abandoned(directory) if directory.is_dir() else ():
        if record.verb == migrate.VERB:
            # Its other half is on another host: only `migrate` itself can tell whether
            # to finish it or take it back, so it stays as it is, stopped and whole here.
            where = record.options[0] if record.options else "another host"
            log.warning(
                "`migrate %s` to %s was cut short: run it again to finish, "
                "or `nspawnctl migrate --abort %s` to listen here again",
                record.name,
                where,
                record.name,
            )
            continue
        if record.forward:
            # Finishing makes a record of its own; this one goes first, so that a kill
            # while finishing leaves exactly one record to settle next time.
            path.unlink(missing_ok=True)
            _finish(paths, record)
        else:
            _take_back(record)  # again from the start if killed: each step is idempotent
            path.unlink(missing_ok=True)
        what = "finished" if record.forward else "took back"
        log.warning("%s an interrupted `%s %s`", what, record.verb, record.name)
        settled.append(f"{record.verb} {record.name}")
    if directory.is_dir():
        _sweep_leftovers(paths)
    if os.geteuid() == 0:
        attach_disks(paths.layers_dir)
    return settled


def _finish(paths: Paths, record: Record) -> None:
    """Changes that can only go forward: `remove` had begun to delete; `image update`
    had perhaps made a new version current, which the containers' units must name."""
    try:
        if record.verb == "remove":
            if container.is_installed(paths, record.name) or container.has_leftovers(
                paths, record.name
            ):
                keep = "--keep-rootfs" in record.options
                container.remove(paths, record.name, keep_rootfs=keep)
        elif record.verb == "image-update":
            with Systemd.connect() as systemd:
                repoint_users(paths, ImageStore(paths.image_dir).get(record.name), systemd)
    except NspawnctlError as err:
        log.warning("finishing `%s %s`: %s", record.verb, record.name, err.message)


def _take_back(record: Record) -> None:
    with Systemd.connect() as systemd:
        for step in reversed(record.steps):
            try:
                take_back(step, systemd)
            except (OSError, NspawnctlError) as err:  # keep taking back the rest
                log.warning("while taking back %s %s: %s", step.kind, step.path, err)


def _sweep_leftovers(paths: Paths) -> None:
    """Hidden leftovers of an interrupted change: a tree renamed away by remove_tree and
    not yet deleted, a layer still being built aside (create_layer). Only those of a
    process that is gone: their names end in its pid."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(paths.layers_dir):
            stem, _sep, pid = entry.name.rpartition("-")
            if (
                entry.name.startswith(".")
                and (stem.endswith(".removing") or stem.endswith(".new"))
                and pid.isdigit()
                and not Path(f"/proc/{pid}").exists()
            ):
                try:
                    remove_tree(Path(entry.path))
                except (OSError, NspawnctlError) as err:  # never in the way of the verb
                    log.warning("cannot delete the leftover %r: %s", entry.path, err)
