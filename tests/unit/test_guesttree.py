"""guesttree: a guest's tree is touched without following a link out of it, to any
depth, never blocking on a FIFO; and no other module of the package walks, deletes or
builds paths in a guest's tree on its own."""

from __future__ import annotations

import ast
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import nspawnctl
from nspawnctl import guesttree
from nspawnctl.guesttree import GuestPathError, GuestTree

ME = (os.getuid(), os.getgid())


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[GuestTree]:
    (tmp_path / "root").mkdir()
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "secret").write_text("HOST SECRET")
    yield GuestTree(tmp_path / "root", "the layer of test")
    guesttree.delete(tmp_path / "root")  # pytest's own clean-up recurses: not deep trees


def host(tree: GuestTree) -> Path:
    return tree.root.parent / "host"


def test_write_makes_directories_and_replaces_whole(tree: GuestTree) -> None:
    make = lambda _relative: (0o750, *ME)  # noqa: E731
    tree.write("etc/ssh/key", "one", 0o600, ME, create=make)
    tree.write("etc/ssh/key", "two", 0o600, ME, create=make)
    assert (tree.root / "etc/ssh/key").read_text() == "two"
    assert stat.S_IMODE((tree.root / "etc/ssh/key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tree.root / "etc").stat().st_mode) == 0o750
    assert sorted(os.listdir(tree.root / "etc/ssh")) == ["key"]  # no temporary left


@pytest.mark.parametrize("absolute", [True, False])
def test_a_link_on_the_way_is_refused_not_followed(tree: GuestTree, absolute: bool) -> None:
    target = host(tree) if absolute else Path("../host")
    (tree.root / "etc").symlink_to(target)
    with pytest.raises(GuestPathError, match="/etc is a link"):
        tree.write("etc/passwd", "pwned", 0o644, ME)
    with pytest.raises(GuestPathError):
        tree.read("etc/secret")
    with pytest.raises(GuestPathError):
        tree.remove("etc/secret")
    assert sorted(os.listdir(host(tree))) == ["secret"]
    assert (host(tree) / "secret").read_text() == "HOST SECRET"


def test_a_link_at_the_end_is_replaced_or_refused_never_followed(tree: GuestTree) -> None:
    (tree.root / "hostname").symlink_to(host(tree) / "secret")
    with pytest.raises(GuestPathError, match="not a regular file"):
        tree.read("hostname")
    tree.write("hostname", "web\n", 0o644, ME)
    assert (host(tree) / "secret").read_text() == "HOST SECRET"
    assert not (tree.root / "hostname").is_symlink()
    (tree.root / "gone").symlink_to(host(tree) / "secret")
    assert tree.remove("gone")
    assert (host(tree) / "secret").exists()


def test_a_fifo_or_an_oversized_file_is_refused_without_opening_it(tree: GuestTree) -> None:
    os.mkfifo(tree.root / "fifo")  # opening it for reading would block for ever
    with pytest.raises(GuestPathError, match="not a regular file"):
        tree.read("fifo")
    (tree.root / "big").write_bytes(b"x" * 100)
    with pytest.raises(GuestPathError, match="larger than"):
        tree.read("big", limit=10)
    assert tree.read("missing") is None


def test_paths_are_nspawnctls_own_plain_relative_ones(tree: GuestTree) -> None:
    for bad in ("/etc/x", "../x", "etc/../x", ""):
        with pytest.raises(ValueError):
            tree.read(bad)


def deep(root: Path, depth: int, bottom: bytes = b"") -> None:
    """`root`/d/d/.../d/bottom, `depth` levels: far deeper than PATH_MAX allows a path."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        file = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(file, bottom)
        os.close(file)
    finally:
        os.close(fd)


def test_walk_and_delete_go_to_any_depth(tree: GuestTree) -> None:
    deep(tree.root, 3000)  # far past Python's recursion limit and PATH_MAX
    (tree.root / "link").symlink_to(host(tree))
    entries = list(guesttree.walk(tree.root))
    assert len(entries) == 3000 + 1 + 1
    bottom = next(e for e in entries if e.name == "bottom")
    assert bottom.path == "d/" * 3000 + "bottom"
    assert not any(e.path.startswith("link/") for e in entries)  # a link is not entered
    assert guesttree.disk_usage(tree.root) > 0
    guesttree.remove_tree(tree.root)
    assert not tree.root.exists()
    assert (host(tree) / "secret").read_text() == "HOST SECRET"


def test_disk_usage_gives_up_at_its_deadline(tree: GuestTree) -> None:
    deep(tree.root, 50)
    with pytest.raises(TimeoutError):
        guesttree.disk_usage(tree.root, seconds=-1)


# What may build a path inside a guest's tree, and walk or delete trees, on its own.
_OWN_WALKERS = {"guesttree.py"}
_BUILDS_LAYER_PATHS = {
    "guesttree.py",
    "layers.py",
    # A guest file's host path, as `apply` shows it; it is read and written through
    # the layer's GuestTree by its relative path (FileChange.guest).
    "reconcile.py",
}
_WALKS = {("os", "walk"), ("shutil", "rmtree"), ("shutil", "copytree"), ("os", "fwalk")}


def _nodes(but: set[str]) -> Iterator[tuple[str, ast.AST]]:
    """Every syntax node of the package's modules, but those named in `but`."""
    for module in sorted(Path(nspawnctl.__file__).parent.rglob("*.py")):
        if module.name not in but:
            for node in ast.walk(ast.parse(module.read_text())):
                yield module.name, node


def test_no_module_but_guesttree_walks_or_deletes_trees() -> None:
    for module, node in _nodes(_OWN_WALKERS):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in _WALKS
        ):
            pytest.fail(f"{module}:{node.lineno}: {node.value.id}.{node.attr}")


def test_no_module_builds_a_path_inside_a_layer_on_its_own() -> None:
    for module, node in _nodes(_BUILDS_LAYER_PATHS):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Div)
            and isinstance(node.left, ast.Attribute)
            and node.left.attr == "upper"
        ):
            pytest.fail(f"{module}:{node.lineno}: a path under a layer's upper/")
