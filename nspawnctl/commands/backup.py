"""snapshot, rollback, export, import: a container's own files kept aside, and back."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from nspawnctl import backup, export
from nspawnctl.commands import add_file, add_name, add_verbs
from nspawnctl.errors import Exit, UsageError
from nspawnctl.guesttree import disk_usage
from nspawnctl.log import log
from nspawnctl.paths import Paths

_FORCE = "copy it even while it runs: frozen for the copy, so of one instant"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parsers = add_verbs(
        sub,
        {
            "snapshot": (
                "copy a stopped container's layer and YAML aside (--list, --remove)",
                run_snapshot,
            ),
            "rollback": (
                "put a stopped container back as it was in one of its snapshots",
                run_rollback,
            ),
            "export": (
                "write a container's YAML and layer (or with --full, its whole tree) to a tar",
                run_export,
            ),
            "import": ("make a container again from a file that export wrote", run_import),
        },
    )
    p = parsers["snapshot"]
    add_name(p)
    p.add_argument("snapshot", metavar="SNAP", nargs="?", help="default: the date and time")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="list NAME's snapshots")
    mode.add_argument("--remove", action="store_true", help="delete NAME's snapshot SNAP")
    p.add_argument("--force", action="store_true", help=_FORCE)
    p = parsers["rollback"]
    add_name(p)
    p.add_argument("snapshot", metavar="SNAP")
    p = parsers["export"]
    add_name(p)
    add_file(
        p,
        "file",
        role="output",
        metavar="FILE",
        type=Path,
        help="compressed as its suffix says: .tar, .tar.zst...",
    )
    p.add_argument(
        "--full", action="store_true", help="the whole tree, layer over image: an image archive"
    )
    p.add_argument("--force", action="store_true", help=_FORCE)
    p = parsers["import"]
    add_file(p, "file", role="input", metavar="FILE", type=Path)
    add_name(p, nargs="?", help="default: the exported name")
    p.add_argument(
        "--image-digest",
        metavar="SHA256",
        help="put the layer on the version of its image with this digest (image list "
        "--json --digest), not on the current one (migrate does)",
    )


def run_snapshot(args: argparse.Namespace, paths: Paths) -> int:
    if args.list or args.remove:
        option = "--list" if args.list else "--remove"
        if args.force:
            raise UsageError(f"--force does not go with {option}")
        if args.list and args.snapshot:
            raise UsageError("--list takes no SNAP", hint=f"nspawnctl snapshot --list {args.name}")
        if args.remove and not args.snapshot:
            raise UsageError("--remove needs the SNAP to delete")
    if args.list:
        _print_list(paths, args.name)
    elif args.remove:
        backup.remove_snapshot(paths, args.name, args.snapshot)
        log.info("removed snapshot %s of %s", args.snapshot, args.name)
    else:
        snap = backup.take(
            paths, args.name, args.snapshot or backup.default_name(), force=args.force
        )
        log.info(
            "snapshot %s of %s%s: %s",
            snap.name,
            args.name,
            " (taken while it ran)" if snap.manifest.live else "",
            snap.path,
        )
        print(snap.name)
    return Exit.OK


def _print_list(paths: Paths, name: str) -> None:
    snapshots = backup.list_snapshots(paths, name)
    if not snapshots and not paths.config_file(name).exists():
        raise UsageError(f"no container {name!r}", hint="see `nspawnctl list`")
    table = [["SNAPSHOT", "CREATED", "SIZE", "IMAGE", "VERSION", "TAKEN"]]
    for snap in snapshots:
        m = snap.manifest
        table.append(
            [
                snap.name,
                m.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                f"{disk_usage(snap.path) / 2**20:.1f}M",
                m.recipe.image,
                m.image_version or "-",
                "running" if m.live else "stopped",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def run_rollback(args: argparse.Namespace, paths: Paths) -> int:
    lower = backup.rollback(paths, args.name, args.snapshot)
    log.info(
        "%s is back as in snapshot %s, on image version %s", args.name, args.snapshot, lower.name
    )
    return Exit.OK


def run_export(args: argparse.Namespace, paths: Paths) -> int:
    target: Path = args.file.absolute()
    manifest = export.export(paths, args.name, target, full=args.full, force=args.force)
    what = "whole tree" if args.full else "layer"
    live = " (taken while it ran)" if manifest.live else ""
    log.info("exported %s's %s and YAML%s to %s", args.name, what, live, target)
    return Exit.OK


def run_import(args: argparse.Namespace, paths: Paths) -> int:
    if args.image_digest is not None and not re.fullmatch(r"[0-9a-f]{64}", args.image_digest):
        raise UsageError(f"--image-digest {args.image_digest!r} is not a SHA-256 in hex")
    done = export.import_(paths, args.file, args.name, image_digest=args.image_digest)
    name = done.config.name
    if done.manifest.full:
        log.info("%s runs on the new template %s made of the tree", name, done.config.image.image)
    elif done.new_identity:
        log.info("%s has a new machine-id and SSH host key: the exported ones are in use", name)
    return Exit.OK
