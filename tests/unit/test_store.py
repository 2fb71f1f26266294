"""The image store names images by key, or by a name only when one image has it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nspawnctl.errors import UsageError
from nspawnctl.recipe import Recipe
from nspawnctl.store import ImageStore

PLAIN = Recipe(method="debootstrap", distro="debian", release="bookworm")
NGINX = Recipe(method="debootstrap", distro="debian", release="bookworm", packages=("nginx",))


def stored(root: Path, *recipes: Recipe) -> ImageStore:
    for recipe in recipes:
        (root / recipe.key / "v1").mkdir(parents=True)
        (root / recipe.key / "recipe.json").write_text(recipe.to_json())
        os.symlink("v1", root / recipe.key / "current")
    return ImageStore(root)


def test_a_name_of_one_image_names_it(tmp_path: Path) -> None:
    store = stored(tmp_path, PLAIN)
    assert store.get("debian:bookworm").key == PLAIN.key
    assert store.get(PLAIN.key).key == PLAIN.key


def test_a_name_of_several_images_chooses_none(tmp_path: Path) -> None:
    """`image update debian:bookworm` once updated whichever came first: the image with
    nginx, not the one the containers used."""
    store = stored(tmp_path, PLAIN, NGINX)
    with pytest.raises(UsageError, match="names 2 images") as raised:
        store.get("debian:bookworm")
    assert PLAIN.key in raised.value.message and NGINX.key in raised.value.message
    assert "nginx" in raised.value.message
    assert {i.key for i in store.matching("debian:bookworm")} == {PLAIN.key, NGINX.key}
    assert store.get(NGINX.key).recipe.packages == ("nginx",)  # the key is always one
    with pytest.raises(UsageError, match="no image"):
        store.get("debian:trixie")
