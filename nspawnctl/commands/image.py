"""image build / image list: the image store."""

from __future__ import annotations

import argparse

from nspawnctl.config import parse_image
from nspawnctl.container import load_all
from nspawnctl.errors import UsageError
from nspawnctl.paths import Paths
from nspawnctl.store import ImageStore, recipe_for


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "the image store: bootstrapped root filesystems that containers are made from"
    p = sub.add_parser("image", help=help_text, description=help_text)
    verbs = p.add_subparsers(dest="image_verb", metavar="IMAGE_VERB", required=True)
    build = verbs.add_parser("build", help="bootstrap an image now (cached: once per recipe)")
    build.add_argument("image", metavar="IMAGE", help="distro:release, e.g. debian:bookworm")
    build.set_defaults(handler=run_build)
    listing = verbs.add_parser("list", help="images in the store and the containers using them")
    listing.set_defaults(handler=run_list)


def run_build(args: argparse.Namespace, paths: Paths) -> int:
    try:
        ref = parse_image(args.image)
    except ValueError as err:
        raise UsageError(f"IMAGE: {err}", hint="e.g. debian:bookworm") from None
    image = ImageStore(paths.image_dir).ensure(recipe_for(ref))
    print(image.path)
    return 0


def run_list(args: argparse.Namespace, paths: Paths) -> int:
    configs, _errors = load_all(paths)
    table = [["IMAGE", "RECIPE", "CONTAINERS"]]
    for image in ImageStore(paths.image_dir).images():
        users = [c.name for c in configs if recipe_for(c.image) == image.recipe]
        recipe = f"{image.recipe.method} {image.recipe.distro}:{image.recipe.release}"
        table.append([image.key, recipe, ",".join(users) or "-"])
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
