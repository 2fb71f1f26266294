"""The tar and directory methods on real trees, with real tar and cp, through the image
store: what an image keeps (owners, modes, links, xattrs) and what it must not
(device nodes, /proc, /run, the host's containers), and that bad or hostile input
fails with a clear message before anything is left in the store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest

from nspawnctl.bootstrap import tar
from nspawnctl.bootstrap.directory import Directory
from nspawnctl.bootstrap.tar import Tar
from nspawnctl.errors import NspawnctlError, OperationError
from nspawnctl.recipe import Recipe, received_recipe
from nspawnctl.run import run
from nspawnctl.store import ImageStore, version_digest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: device nodes and files of other owners"
)

OS_RELEASE = 'ID=fakeos\nPRETTY_NAME="Fake OS"\n'
TAR_OPTIONS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")
COMPRESSIONS = {".tar": [], ".tar.gz": ["--gzip"], ".tar.xz": ["--xz"], ".tar.zst": ["--zstd"]}
XATTR = "user.nspawnctl"


def _quiet(_line: str) -> None:
    pass


def make_tree(root: Path, *, os_release: bool = True, systemd: bool = True) -> Path:
    """A small OS tree, with what a copy of a running system also has."""
    for d in ("etc/ssh", "usr/bin", "usr/lib/systemd", "home/user", "srv", "var/lib/dpkg"):
        (root / d).mkdir(parents=True)
    if os_release:
        (root / "etc/os-release").write_text(OS_RELEASE)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret\n")
    (root / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")  # absolute is fine here
    if systemd:
        init = root / "usr/lib/systemd/systemd"
        init.write_text("#!/bin/sh\nexit 0\n")
        init.chmod(0o755)
        (root / "usr/bin/init").symlink_to("../lib/systemd/systemd")
    tool = root / "usr/bin/tool"
    tool.write_text("a tool\n")
    tool.chmod(0o4755)  # setuid
    os.link(tool, root / "srv/tool-link")  # a hard link across top directories
    if shutil.which("setcap"):
        run(["setcap", "cap_net_raw+ep", root / "usr/bin/tool"])
    own = root / "home/user/notes"
    own.write_text("mine\n")
    os.chown(own, 1234, 1234)
    own.chmod(0o640)
    os.chown(root / "home/user", 1234, 1234)
    (root / "var/lib/dpkg/status").write_text("Package: fake\n")
    with contextlib.suppress(OSError):  # a file system without user xattrs
        os.setxattr(root / "var/lib/dpkg/status", XATTR, b"kept")
    # What a running system or a careless copy adds.
    for d in ("dev/pts", "proc/1", "sys/kernel", "run/lock", "var/lib/machines/old/etc"):
        (root / d).mkdir(parents=True)
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "srv/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "srv/disk", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    (root / "proc/1/status").write_text("Name: init\n")
    (root / "sys/kernel/x").write_text("x\n")
    (root / "run/lock/pid").write_text("1\n")
    (root / "var/lib/machines/old/etc/os-release").write_text(OS_RELEASE)
    (root / "var/lib/nspawnctl/images").mkdir(parents=True)
    # Last: a directory's owner, mode and times, to see them kept.
    lib = root / "var/lib"
    os.chown(lib, 1234, 0)
    lib.chmod(0o751)
    os.utime(lib, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return root


def make_archive(tree: Path, archive: Path, *, names: str = "./") -> Path:
    """tar of `tree`, members named ./etc/..., etc/... or /etc/..."""
    suffix = "".join(s for s in archive.suffixes if s in (".tar", ".gz", ".xz", ".zst"))
    argv: list[str | Path] = ["tar", *TAR_OPTIONS, *COMPRESSIONS[suffix], "-C", tree]
    if names == "./":
        argv += ["-cf", archive, "."]
    elif names == "":
        argv += ["-cf", archive, "--", *sorted(os.listdir(tree))]
    else:
        argv += ["--absolute-names", "--transform=s,^\\./,/,", "-cf", archive, "."]
    run(argv)
    return archive


def has_xattrs(path: Path) -> bool:
    try:
        return os.getxattr(path, XATTR) == b"kept"
    except OSError:
        return False


def check_image(rootfs: Path, tree: Path) -> None:
    """What every imported image must be."""
    for directory, _dirs, files in os.walk(rootfs):
        for name in files:
            mode = os.lstat(os.path.join(directory, name)).st_mode
            assert not stat.S_ISCHR(mode) and not stat.S_ISBLK(mode), f"{directory}/{name}"
    for top in ("dev", "proc", "sys", "run"):
        assert (rootfs / top).is_dir() and not (rootfs / top).is_symlink()
        assert os.listdir(rootfs / top) == [], top
    assert (rootfs / "etc/os-release").read_text() == OS_RELEASE
    assert (rootfs / "etc/machine-id").read_text() == ""
    assert list((rootfs / "etc/ssh").iterdir()) == []
    notes = (rootfs / "home/user/notes").stat()
    assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (1234, 1234, 0o640)
    assert (rootfs / "home/user").stat().st_uid == 1234
    assert stat.S_IMODE((rootfs / "usr/bin/tool").stat().st_mode) == 0o4755
    assert stat.S_IMODE((rootfs / "usr/lib/systemd/systemd").stat().st_mode) == 0o755
    assert os.readlink(rootfs / "usr/bin/init") == "../lib/systemd/systemd"
    assert os.readlink(rootfs / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert (rootfs / "usr/bin/tool").stat().st_ino == (rootfs / "srv/tool-link").stat().st_ino
    assert (rootfs / "usr/bin/tool").stat().st_nlink == 2
    lib, source_lib = (rootfs / "var/lib").stat(), (tree / "var/lib").stat()
    assert (lib.st_uid, stat.S_IMODE(lib.st_mode), lib.st_mtime_ns) == (
        1234,
        0o751,
        source_lib.st_mtime_ns,
    )
    if has_xattrs(tree / "var/lib/dpkg/status"):
        assert has_xattrs(rootfs / "var/lib/dpkg/status")
    if shutil.which("setcap"):
        capability = "security.capability"
        assert os.getxattr(rootfs / "usr/bin/tool", capability) == os.getxattr(
            tree / "usr/bin/tool", capability
        )


def snapshot(root: Path, *skip: Path) -> dict[str, tuple[int, int, int, str]]:
    """Everything below root: type and mode, owner, link count, content or link."""
    found = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(directory, d) not in skip]
        for name in (*dirs, *files):
            path = Path(directory, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = os.readlink(path) if path.is_symlink() else ""
            found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_nlink, content)
    return found


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    store = ImageStore(tmp_path / "store")
    with store.locked():  # makes the directory and its lock file
        pass
    yield store


def fails_cleanly(store: ImageStore, recipe: Recipe, match: str) -> NspawnctlError:
    before = sorted(os.listdir(store.root))
    with pytest.raises(NspawnctlError, match=match) as caught:
        store.ensure(recipe)
    assert sorted(os.listdir(store.root)) == before == [".lock"]
    return caught.value


# -- an image from another host (migrate sends one) -----------------------------------


def test_an_image_received_from_another_host_keeps_its_key_and_digest(
    tmp_path: Path, tree: Path, store: ImageStore
) -> None:
    """A version exported from one store (as migrate does) arrives in another under the
    recipe's own key, not as a template, the same to the last byte by version_digest."""
    there = ImageStore(tmp_path / "there")
    recipe = Recipe(method="debootstrap", distro="debian", release="bookworm")
    made = there.import_tree(recipe, tree)
    archive = tmp_path / "image.tar.zst"
    tar.create(archive, [(made.current, ["."])])
    digest = version_digest(made.current)
    version = store.receive(recipe, archive, digest)
    image = store.find(recipe)
    assert image is not None and image.recipe == recipe and version == image.current
    assert version_digest(version) == digest
    # Received again: that very version is there already, nothing is added.
    assert store.receive(recipe, archive, digest) == version

    # A store with another version of the image gets this one beside it, not current.
    (tree / "etc/changed").write_text("another version\n")
    other = ImageStore(tmp_path / "other")
    other.import_tree(recipe, tree)
    beside = other.receive(recipe, archive, digest)
    image = other.find(recipe)
    assert image is not None and beside == image.path / "v2" and image.current.name == "v1"
    assert version_digest(beside) == digest and (image.path / ".v2.sha256").is_file()
    assert not list(image.path.glob(".v*.tmp*"))


def test_an_image_that_arrives_changed_is_not_kept(
    tmp_path: Path, tree: Path, store: ImageStore
) -> None:
    archive = make_archive(tree, tmp_path / "image.tar")
    recipe = Recipe(method="debootstrap", distro="debian", release="bookworm")
    with pytest.raises(OperationError, match="is not the version it was made of"):
        store.receive(recipe, archive, "0" * 64)
    assert sorted(os.listdir(store.root)) == [".lock"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "not a recipe"),
        ('{"method": "tar", "name": "../../etc"}', "not a template name"),
        ('{"method": "debootstrap", "distro": "debian", "release": "a/b"}', "not a release"),
        ('{"method": "debootstrap", "distro": "debian", "release": "x", "evil": 1}', "not a"),
        ('{"method": "dnf", "distro": "debian", "release": "bookworm"}', "built with"),
        ('{"method": "debootstrap", "distro": 1, "release": "x"}', "string or null"),
        (
            '{"method": "debootstrap", "distro": "debian", "release": "x", "packages": ["b", "a"]}',
            "not a recipe nspawnctl makes",
        ),
    ],
)
def test_a_received_recipe_is_one_the_yaml_could_ask_for(text: str, problem: str) -> None:
    """Its key becomes a directory name in the store: never a path, never a stranger's."""
    with pytest.raises(ValueError, match=problem):
        received_recipe(text)
    for recipe in (
        Recipe(method="tar", name="web", source="/x.tar"),
        Recipe(method="debootstrap", distro="debian", release="bookworm", packages=("a", "b")),
    ):
        assert received_recipe(recipe.to_json()) == recipe


# -- tar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "names"),
    [
        (".tar", "./"),
        (".tar.gz", "./"),
        (".tar.xz", "./"),
        (".tar.zst", "./"),
        (".tar", ""),  # members named etc/..., not ./etc/...
        (".tar.gz", "/"),  # and /etc/...
    ],
)
def test_tar_import(tmp_path: Path, tree: Path, store: ImageStore, suffix: str, names: str) -> None:
    archive = make_archive(tree, tmp_path / f"fake{suffix}", names=names)
    image = store.ensure(Recipe(method="tar", name="t1", source=str(archive)))
    assert image.key == "template-t1"
    check_image(image.current, tree)
    assert store.ensure(Recipe(method="tar", name="t1", source=str(archive))) == image


@pytest.mark.parametrize("names", ["./", "", "/"])
def test_tar_does_not_extract_dev_proc_sys_run(tmp_path: Path, tree: Path, names: str) -> None:
    """Not even for the store to clean up later; devices elsewhere it does clean up."""
    archive = make_archive(tree, tmp_path / "fake.tar", names=names)
    target = tmp_path / "target"
    Tar().build(Recipe(method="tar", name="t", source=str(archive)), target, _quiet)
    for top in ("dev", "proc", "sys", "run"):
        assert os.listdir(target / top) == [], top
    assert stat.S_ISCHR((target / "srv/null").lstat().st_mode)


def test_tar_excludes_only_top_directories(tmp_path: Path, tree: Path) -> None:
    for path in ("usr/share/dev/keep", "etc/run/keep", "srv/proc/keep"):
        (tree / path).parent.mkdir(parents=True)
        (tree / path).write_text("keep\n")
    target = tmp_path / "target"
    archive = make_archive(tree, tmp_path / "fake.tar")
    Tar().build(Recipe(method="tar", name="t", source=str(archive)), target, _quiet)
    for path in ("usr/share/dev/keep", "etc/run/keep", "srv/proc/keep"):
        assert (target / path).read_text() == "keep\n"


def test_tar_hostile_archive_stays_inside(tmp_path: Path, store: ImageStore) -> None:
    case = tmp_path / "case"
    victim = case / "victim"
    victim.mkdir(parents=True)
    (victim / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (case / "outside").write_text("outside\n")
    absolute = f"/nspawnctl-test-{tmp_path.name}"
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:

        def member(name: str, data: bytes = b"pwned\n", kind: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            if kind:
                info.type, info.linkname = kind, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, BytesIO(data))

        member("../evil")
        member("./a/../../evil2")
        member(absolute)
        member("etc", kind=tarfile.SYMTYPE, link=str(victim))  # etc -> /etc, in a tmp dir
        member("etc/passwd")
        member("etc/new")
        member("up", kind=tarfile.SYMTYPE, link="..")
        member("up/evil3")
        member("hard", kind=tarfile.LNKTYPE, link="../outside")
        member("hard", b"overwritten through a hard link\n")
        member("file", kind=tarfile.SYMTYPE, link=str(case / "outside"))
        member("file", b"overwritten through a symlink\n")
    before = snapshot(case)
    target = case / "target"
    with pytest.raises(OperationError, match=r"cannot extract .*hostile\.tar: tar: "):
        Tar().build(Recipe(method="tar", name="h", source=str(archive)), target, _quiet)
    assert snapshot(case, target) == before
    assert not os.path.lexists(absolute)
    # What tar did instead: stripped `/`, refused `..`, made the links only at the end.
    assert (target / absolute.lstrip("/")).read_text() == "pwned\n"
    assert not os.path.lexists(target / "evil") and not os.path.lexists(target / "evil2")
    assert os.readlink(target / "etc") == str(victim)
    assert (target / "hard").read_text() == "overwritten through a hard link\n"
    assert (target / "hard").stat().st_nlink == 1
    fails_cleanly(store, Recipe(method="tar", name="h", source=str(archive)), "cannot extract")
    assert snapshot(case, target) == before


@pytest.mark.parametrize("link", ["etc", "etc/ssh"])
def test_tar_symlink_out_of_the_tree_is_refused(
    tmp_path: Path, tree: Path, store: ImageStore, link: str
) -> None:
    """etc -> /etc extracts fine, and the host's /etc has an os-release; but the store,
    stripping the image's identity, would then delete the host's ssh host keys and
    empty its machine-id."""
    host_etc = make_tree(tmp_path / "host")
    before = snapshot(host_etc)
    shutil.rmtree(tree / link)
    (tree / link).symlink_to(host_etc / link)
    archive = make_archive(tree, tmp_path / "fake.tar.zst")
    fails_cleanly(
        store,
        Recipe(method="tar", name="t", source=str(archive)),
        f"/{link} -> {host_etc}/{link} leads out of the root filesystem",
    )
    assert snapshot(host_etc) == before


def test_tar_nested_tree_says_so(tmp_path: Path, store: ImageStore) -> None:
    make_tree(tmp_path / "wrap/rootfs")
    archive = make_archive(tmp_path / "wrap", tmp_path / "wrapped.tar.gz")
    fails_cleanly(
        store,
        Recipe(method="tar", name="t", source=str(archive)),
        "holds a root filesystem in its directory rootfs/",
    )


# -- directory ------------------------------------------------------------------------


def test_directory_import(tree: Path, store: ImageStore) -> None:
    image = store.ensure(Recipe(method="directory", name="d1", source=str(tree)))
    check_image(image.current, tree)
    assert not os.path.lexists(image.current / "var/lib/machines")
    assert not os.path.lexists(image.current / "var/lib/nspawnctl")
    assert (image.current / "var/lib/dpkg/status").is_file()
    assert stat.S_IMODE(image.current.stat().st_mode) == stat.S_IMODE(tree.stat().st_mode)


def test_directory_does_not_copy_dev_proc_sys_run(tmp_path: Path, tree: Path) -> None:
    target = tmp_path / "target"
    Directory().build(Recipe(method="directory", name="d", source=str(tree)), target, _quiet)
    for top in ("dev", "proc", "sys", "run"):
        assert os.listdir(target / top) == [], top
    assert sorted(os.listdir(target / "var/lib")) == ["dpkg"]


def test_directory_other_file_systems_are_empty_mount_points(
    tmp_path: Path, tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mount point at the top (made here) and deeper down (cp's --one-file-system)."""
    mounts = [tree / "mnt", tree / "srv/data"]
    mounted: list[Path] = []
    try:
        for point in mounts:
            point.mkdir()
            try:
                run(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", point])
            except OperationError as err:
                pytest.skip(f"cannot mount a tmpfs here: {err.message}")
            mounted.append(point)
            (point / "inside").write_text("not copied\n")
        recipe = Recipe(method="directory", name="d", source=str(tree))
        Directory().check(recipe)
        assert f"(copied as empty directories): {mounts[0]} {mounts[1]}" in caplog.text
        target = tmp_path / "target"
        Directory().build(recipe, target, _quiet)
        for point in mounts:
            copy = target / point.relative_to(tree)
            assert copy.is_dir() and os.listdir(copy) == []
            assert stat.S_IMODE(copy.stat().st_mode) == 0o711  # the mounted root's, as cp
    finally:
        for point in reversed(mounted):
            run(["umount", point])


def test_directory_store_inside_the_source(tree: Path) -> None:
    """Like `/` with the store in /var/lib/nspawnctl: it is skipped, so it may be there."""
    store = ImageStore(tree / "var/lib/nspawnctl/images")
    image = store.ensure(Recipe(method="directory", name="self", source=str(tree)))
    assert not os.path.lexists(image.current / "var/lib/nspawnctl")
    elsewhere = ImageStore(tree / "srv/images")
    with elsewhere.locked():
        pass
    fails_cleanly(
        elsewhere,
        Recipe(method="directory", name="self", source=str(tree)),
        "cannot copy .* into the image store inside it",
    )


def test_directory_symlink_out_of_the_tree_is_refused(
    tmp_path: Path, tree: Path, store: ImageStore
) -> None:
    victim = tmp_path / "host-dbus"
    victim.mkdir()
    (victim / "machine-id").write_text("host\n")
    (tree / "var/lib/dbus").symlink_to(victim)
    fails_cleanly(
        store,
        Recipe(method="directory", name="d", source=str(tree)),
        "/var/lib/dbus -> .* leads out of the root filesystem",
    )
    assert (victim / "machine-id").read_text() == "host\n"


def test_directory_live_root_is_allowed_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    Directory().check(Recipe(method="directory", name="live", source="/"))
    assert "copying the running system's /" in caplog.text


# -- bad input, both methods ------------------------------------------------------------


def _text(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("not an archive\n" * 100)
    return tmp_path / "notes.txt"


def _fake_zst(tmp_path: Path) -> Path:
    (tmp_path / "fake.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 100)
    return tmp_path / "fake.tar.zst"


def _not_os(tmp_path: Path, suffix: str, **missing: bool) -> Path:
    tree = make_tree(tmp_path / "not-os", **missing)
    return make_archive(tree, tmp_path / f"not-os{suffix}") if suffix else tree


@pytest.mark.parametrize(
    ("method", "source", "match"),
    [
        ("tar", lambda t: t / "missing.tar", "missing.tar: no such file"),
        ("directory", lambda t: t / "missing", "missing: no such directory"),
        ("directory", _text, "notes.txt: not a directory"),
        ("tar", _text, "notes.txt is not a tar archive"),
        ("tar", lambda t: t, "is a directory, not an archive"),
        ("tar", _fake_zst, "cannot extract .*fake.tar.zst"),
        ("tar", lambda t: _not_os(t, ".tar.xz", os_release=False), "not a root file.*os-release"),
        ("tar", lambda t: _not_os(t, ".tar", systemd=False), "not a root filesystem.*systemd"),
        ("directory", lambda t: _not_os(t, "", os_release=False), "not a root filesystem"),
    ],
)
def test_bad_source_fails_before_anything_is_stored(
    tmp_path: Path, store: ImageStore, method: str, source: Callable[[Path], Path], match: str
) -> None:
    path = source(tmp_path)
    error = fails_cleanly(store, Recipe(method=method, name="bad", source=str(path)), match)
    assert error.hint
