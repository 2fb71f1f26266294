"""The dnf bootstrap method, with the real dnf, against a local repository of tiny RPMs
built by the session (tests/integration/rpm_repo.py): no Fedora mirror is needed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nspawnctl.bootstrap import bootstrapper
from nspawnctl.bootstrap.dnf import BASE_PACKAGES, dnf_command, gpg_keys, local_path, mirror_url
from nspawnctl.errors import OperationError
from nspawnctl.recipe import Recipe
from nspawnctl.run import run
from nspawnctl.store import ImageStore
from tests.integration.rpm_repo import (  # noqa: F401  (the *_fixture: fixtures)
    EXTRA,
    EXTRA_DOC,
    EXTRA_FILE,
    OS_RELEASE,
    PACKAGES,
    RELEASE_PACKAGE,
    WEAK,
    RpmPackage,
    RpmRepo,
    build_repo,
    rpm_repo_fixture,
    rpm_tools_fixture,
)

pytestmark = pytest.mark.integration

# Where dnf on this host keeps its own cache and logs: a build must not touch them.
HOST_DNF_PATHS = (Path("/var/cache/dnf"), Path("/var/log/dnf.log"), Path("/var/log/hawkey.log"))


def fedora(mirror: str | None, *packages: str) -> Recipe:
    return Recipe(method="dnf", distro="fedora", release="40", mirror=mirror, packages=packages)


def host_dnf_state() -> dict[Path, int | None]:
    state: dict[Path, int | None] = {}
    for path in HOST_DNF_PATHS:
        found = [path, *path.rglob("*")] if path.is_dir() else [path]
        state.update({p: p.stat().st_mtime_ns if p.exists() else None for p in found})
    return state


def installed(root: Path, dbpath: str) -> set[str]:
    out = run(["rpm", "--root", root, "--dbpath", dbpath, "-qa", "--qf", "%{NAME}\\n"])
    return set(out.stdout.split())


def test_installs_base_and_extra_packages(rpm_repo: RpmRepo, tmp_path: Path) -> None:
    recipe = fedora(rpm_repo.url, EXTRA)
    builder = bootstrapper("dnf")
    builder.check(recipe)
    root = tmp_path / "root"
    lines: list[str] = []
    before = host_dnf_state()

    builder.build(recipe, root, lines.append)

    assert (root / EXTRA_FILE).read_text() == "hello from an rpm\n"
    assert (root / "usr/lib/systemd/systemd").is_file()
    assert not (root / EXTRA_DOC).exists()  # --nodocs
    # The guest's own rpm finds the database where it looks (not in Debian's ~/.rpmdb).
    assert not (root / "root/.rpmdb").exists()
    names = installed(root, "/usr/lib/sysimage/rpm")
    assert names == {*BASE_PACKAGES, RELEASE_PACKAGE, EXTRA}  # WEAK is only recommended
    assert WEAK not in names
    # dnf's cache and logs are gone; nothing of them was left on the host.
    assert not (root / "var/cache/dnf").exists()
    assert [p.name for p in (root / "var/log").iterdir()] == []
    assert host_dnf_state() == before
    # Progress got dnf's own output, line by line.
    assert any(line.startswith("Installing") for line in lines)
    assert lines[-1].strip() == "Complete!"


def test_store_builds_the_image_once(rpm_repo: RpmRepo, tmp_path: Path) -> None:
    # A mirror of our own, removed after the first build: a second build would fail.
    mirror = tmp_path / "mirror"
    shutil.copytree(rpm_repo.path, mirror)
    recipe = fedora(mirror.as_uri(), EXTRA)
    store = ImageStore(tmp_path / "images")

    image = store.ensure(recipe)

    assert image.path == tmp_path / "images" / recipe.key
    assert os.readlink(image.path / "current") == "v1"
    assert image.current == image.path / "v1"
    assert image.recipe == recipe
    assert (image.current / EXTRA_FILE).is_file()
    assert (image.current / "etc/machine-id").read_text() == ""  # finish_rootfs ran
    built = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (image.path, image.current)]

    shutil.rmtree(mirror)
    again = store.ensure(recipe)

    assert again == image
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (again.path, again.current)] == built
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", recipe.key]


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_a_mirror_that_is_not_a_repository(rpm_tools: None, tmp_path: Path, make: str) -> None:
    mirror = tmp_path / "mirror"
    if make == "empty":
        mirror.mkdir()
        (mirror / "systemd-1-1.noarch.rpm").write_text("not indexed")
    store_root = tmp_path / "images"
    store_root.mkdir()

    with pytest.raises(OperationError) as error:
        ImageStore(store_root).ensure(fedora(mirror.as_uri()))

    if make == "empty":
        assert "not a dnf repository" in error.value.message
        assert error.value.hint == f"index its packages: createrepo_c {mirror}"
    else:
        assert f"{mirror} does not exist" in error.value.message
    assert list(store_root.iterdir()) == []


def test_a_release_that_is_not_one(rpm_tools: None, rpm_repo: RpmRepo) -> None:
    recipe = Recipe(method="dnf", distro="fedora", release="bookworm", mirror=rpm_repo.url)
    with pytest.raises(OperationError, match="'bookworm' is not a fedora release"):
        bootstrapper("dnf").check(recipe)


def test_a_network_mirror_needs_the_key_on_this_host(rpm_tools: None) -> None:
    recipe = fedora(None)
    if gpg_keys(recipe):
        pytest.skip("this host has the Fedora 40 key")
    with pytest.raises(OperationError, match="no GPG key for fedora:40 on this host"):
        bootstrapper("dnf").check(recipe)


def test_keys_are_found_on_the_host(tmp_path: Path) -> None:
    pki, shared = tmp_path / "pki", tmp_path / "distribution-gpg-keys"
    (shared / "fedora").mkdir(parents=True)
    pki.mkdir()
    for key in (
        pki / "RPM-GPG-KEY-fedora-40-primary",
        shared / "fedora/RPM-GPG-KEY-fedora-40-primary",
        shared / "fedora/RPM-GPG-KEY-fedora-39-primary",
    ):
        key.write_text("key")
    assert gpg_keys(fedora(None), (pki, shared)) == [
        pki / "RPM-GPG-KEY-fedora-40-primary",
        shared / "fedora/RPM-GPG-KEY-fedora-40-primary",
    ]


def test_the_dnf_command_line(rpm_tools: None, tmp_path: Path) -> None:
    # Of the host's dnf setup, nothing: an empty dnf.conf and repository directory.
    argv = [str(a) for a in dnf_command(fedora(None), tmp_path / "root", tmp_path)]
    assert f"--config={tmp_path / 'dnf.conf'}" in argv
    assert (tmp_path / "dnf.conf").read_text() == "[main]\n"
    assert f"--setopt=reposdir={tmp_path / 'repos.d'}" in argv
    assert list((tmp_path / "repos.d").iterdir()) == []
    # The URL goes to dnf as it is: dnf expands the variables.
    assert (
        "--repofrompath=nspawnctl,https://dl.fedoraproject.org/pub/fedora/linux/releases/"
        "$releasever/Everything/$basearch/os/"
    ) in argv
    assert "--setopt=nspawnctl.gpgcheck=True" in argv
    assert "--nogpgcheck" not in argv
    # A plain path is a local repository.
    assert mirror_url(fedora("/srv/a repo")) == "file:///srv/a%20repo"
    assert local_path("file:///srv/a%20repo") == Path("/srv/a repo")


def test_an_absolute_symlink_does_not_lead_into_the_host(rpm_tools: None, tmp_path: Path) -> None:
    # A release package whose rpm database directory is an absolute symlink: on the
    # host, it names a directory of the host's.
    host_dir = tmp_path / "host-rpmdb"
    host_dir.mkdir()
    release = RpmPackage(
        RELEASE_PACKAGE, (OS_RELEASE,), links=(("usr/lib/sysimage/rpm", str(host_dir)),)
    )
    packages = (*(p for p in PACKAGES if p.name != RELEASE_PACKAGE), release)
    repo = build_repo(tmp_path / "repo", packages)

    with pytest.raises(OperationError, match="leads out of the image"):
        bootstrapper("dnf").build(fedora(repo.url), tmp_path / "root", lambda _line: None)

    assert list(host_dir.iterdir()) == []
