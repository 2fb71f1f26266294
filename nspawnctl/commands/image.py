"""image build / list / update / remove / export / import: the image store."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from nspawnctl.bootstrap import tar
from nspawnctl.commands import add_file, add_verbs
from nspawnctl.container import merged_view, users_of
from nspawnctl.errors import Exit, OperationError, UsageError
from nspawnctl.guesttree import disk_usage
from nspawnctl.log import log
from nspawnctl.names import machine_name
from nspawnctl.paths import Paths
from nspawnctl.recipe import TEMPLATE, Recipe, parse_image, received_recipe
from nspawnctl.store import Image, ImageStore, version_digest
from nspawnctl.update import default_command, update_image


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "the image store: root filesystems that containers are layers over"
    p = sub.add_parser("image", help=help_text, description=help_text)
    verbs = p.add_subparsers(dest="image_verb", metavar="IMAGE_VERB", required=True)
    parsers = add_verbs(
        verbs,
        {
            "build": (
                "bootstrap an image now, or make a template from a stopped container (--from)",
                run_build,
            ),
            "list": (
                "images in the store: recipe, version, size, the containers using them",
                run_list,
            ),
            "update": (
                "run a command in an image (default: its distribution's upgrade); every "
                "container sees the result on its next start",
                run_update,
            ),
            "remove": ("delete an image no container uses", run_remove),
            "export": (
                "write an image's current version to a tar archive (.tar, .tar.gz, .tar.zst...)",
                run_export,
            ),
            "import": (
                "make template:NAME from a root filesystem archive or directory",
                run_import,
            ),
        },
    )
    parsers["build"].add_argument(
        "image", metavar="IMAGE", help="distro:release, or template:NAME with --from"
    )
    parsers["build"].add_argument(
        "--from",
        dest="source",
        metavar="CONTAINER",
        type=machine_name,
        help="a stopped container to copy",
    )
    parsers["list"].add_argument("--json", action="store_true", help="print JSON")
    parsers["list"].add_argument(
        "--digest",
        action="store_true",
        help="with --json: the digest of each current version (digest) and of every "
        "version (versions), worked out once, then kept",
    )
    for verb in ("update", "remove", "export"):
        parsers[verb].add_argument(
            "image", metavar="IMAGE", help="as in the YAML (debian:bookworm, template:NAME) or key"
        )
    for verb in ("update", "remove"):
        parsers[verb].add_argument(
            "--all",
            action="store_true",
            help="every image of that name (one name may stand for several recipes)",
        )
    parsers["update"].add_argument(
        "--no-snapshot",
        dest="snapshot",
        action="store_false",
        help="take no pre-update-VERSION snapshot of the image's containers",
    )
    parsers["update"].add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    add_file(parsers["export"], "file", role="output", metavar="FILE", type=Path)
    add_file(
        parsers["import"],
        "file",
        role="input",
        metavar="FILE",
        type=Path,
        help="a .tar[.gz|.xz|.zst] archive or a directory",
    )
    parsers["import"].add_argument(
        "name", metavar="NAME", nargs="?", help="the new image is template:NAME"
    )
    add_file(
        parsers["import"],
        "--recipe",
        role="input",
        metavar="RECIPE",
        type=Path,
        help="instead of NAME: the recipe.json of the image the archive was exported from "
        "on another host; the image gets its key, and containers naming it find it",
    )
    parsers["import"].add_argument(
        "--digest",
        metavar="SHA256",
        help="with --recipe: the version's digest there (image list --json --digest); "
        "if what arrived differs, nothing is kept",
    )


def _recipe(value: str) -> Recipe:
    try:
        return parse_image(value)
    except ValueError as err:
        raise UsageError(f"IMAGE: {err}", hint="e.g. debian:bookworm or template:NAME") from None


def _store(paths: Paths) -> ImageStore:
    return ImageStore(paths.image_dir)


def run_build(args: argparse.Namespace, paths: Paths) -> int:
    recipe = _recipe(args.image)
    if args.source is None:
        image = _store(paths).ensure(recipe)
    elif recipe.method != TEMPLATE:
        raise UsageError("--from makes a template: name it template:NAME")
    else:
        with merged_view(paths, args.source) as tree:
            source = Recipe(method="directory", name=recipe.name, source=f"container {args.source}")
            image = _store(paths).import_tree(source, tree)
    print(image.path)
    return Exit.OK


def run_list(args: argparse.Namespace, paths: Paths) -> int:
    rows: list[dict[str, Any]] = [
        {
            "image": image.recipe.image,
            # What names one image when several share a name (update and remove take it).
            "key": image.key,
            "version": image.current.name,
            "size_bytes": disk_usage(image.current),
            "containers": [c.name for c in users_of(paths, image)],
            "recipe": image.recipe.describe(),
            **(
                {
                    "digest": version_digest(image.current),
                    "versions": {v.name: version_digest(v) for v in image.versions()},
                }
                if args.digest
                else {}
            ),
        }
        for image in _store(paths).images()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return Exit.OK
    table = [["IMAGE", "KEY", "VERSION", "SIZE", "CONTAINERS", "RECIPE"]]
    for r in rows:
        size = f"{r['size_bytes'] / 2**20:.0f}M"
        users = ",".join(r["containers"]) or "-"
        table.append([r["image"], r["key"], r["version"], size, users, r["recipe"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return Exit.OK


def _chosen(args: argparse.Namespace, paths: Paths) -> list[Image]:
    """The images IMAGE means: one (by key, or a name of one image), or with --all every
    image of that name; each is named as it is acted on."""
    if not args.all:
        return [_store(paths).get(args.image)]
    found = _store(paths).matching(args.image)
    if not found:
        _store(paths).get(args.image)  # raises: no such image
    return found


def run_update(args: argparse.Namespace, paths: Paths) -> int:
    for image in _chosen(args, paths):
        log.info("updating %s (%s)", image.key, image.recipe.describe())
        _update(args, paths, image)
    return Exit.OK


def _update(args: argparse.Namespace, paths: Paths, image: Image) -> None:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    command = command or default_command(image.recipe)
    report = update_image(paths, image, command, snapshot=args.snapshot)
    if report.snapshots:
        snap = report.snapshots[0].name
        log.info(
            "snapshot %s of %s; undo the update for one with `nspawnctl rollback NAME %s`",
            snap,
            " ".join(s.container for s in report.snapshots),
            snap,
        )
    log.info("%s: %s is now %s", image.recipe.image, report.old.name, report.new.name)
    if report.restart:
        log.info("running on the old version until restarted: %s", " ".join(report.restart))
    for name, files in report.conflicts.items():
        log.warning(
            "%s has its own copy of %d file(s) the update changed; its copy wins: %s",
            name,
            len(files),
            " ".join(files[:10]) + (" ..." if len(files) > 10 else ""),
        )


def run_remove(args: argparse.Namespace, paths: Paths) -> int:
    images = _chosen(args, paths)
    for image in images:  # all of them unused, or none removed
        users = users_of(paths, image)
        if users:
            raise UsageError(
                f"{image.recipe.image} ({image.key}) is used by: "
                + ", ".join(c.name for c in users),
                hint="remove those containers first",
            )
    for image in images:
        _store(paths).remove(image)
        log.info("removed image %s (%s)", image.recipe.image, image.key)
    return Exit.OK


def run_export(args: argparse.Namespace, paths: Paths) -> int:
    image = _store(paths).get(args.image)
    target: Path = args.file.absolute()
    tar.create(target, [(image.current, ["."])])
    log.info("exported %s (%s) to %s", image.recipe.image, image.current.name, target)
    return Exit.OK


def run_import(args: argparse.Namespace, paths: Paths) -> int:
    source: Path = args.file.absolute()
    if not source.exists():
        raise OperationError(f"{source}: no such file or directory")
    if (args.name is None) == (args.recipe is None):
        raise UsageError("give NAME (a new template) or --recipe (an image from another host)")
    if args.recipe is not None:
        return _import_received(paths, source, args.recipe, args.digest)
    if args.digest is not None:
        raise UsageError("--digest goes with --recipe")
    recipe = _recipe(f"{TEMPLATE}:{args.name}")
    if _store(paths).find(recipe) is not None:
        raise UsageError(
            f"image {recipe.image} exists already",
            hint=f"`nspawnctl image remove {recipe.image}` first, or another NAME",
        )
    method = "directory" if source.is_dir() else "tar"
    image = _store(paths).ensure(Recipe(method=method, name=recipe.name, source=str(source)))
    print(image.path)
    return Exit.OK


def _import_received(paths: Paths, archive: Path, recipe_file: Path, digest: str | None) -> int:
    try:
        recipe = received_recipe(recipe_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(
            f"--recipe {recipe_file}: {err}", hint="give images/KEY/recipe.json of the other host"
        ) from None
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UsageError(f"--digest {digest!r} is not a SHA-256 in hex")
    version = _store(paths).receive(recipe, archive, digest)
    log.info("image %s (%s) has the version as %s", recipe.image, recipe.key, version.name)
    print(version)
    return Exit.OK
