"""A local dnf repository of tiny noarch RPMs, built once per test session with the
real rpmbuild and createrepo_c, so that the dnf method can be tested without a Fedora
mirror. Its packages carry the names the dnf method installs for fedora (see
`nspawnctl.bootstrap.dnf.BASE_PACKAGES`), and together make a tree that the image store
accepts: /usr/lib/systemd/systemd and /etc/os-release. Nothing in it is ever booted."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from nspawnctl.bootstrap.dnf import BASE_PACKAGES
from nspawnctl.run import run

TOOLS = ("dnf", "rpm", "rpmbuild", "createrepo_c")
EXTRA = "nspawnctl-test-extra"  # what a recipe's `packages:` adds
EXTRA_FILE = "usr/share/nspawnctl-test-extra/hello"
EXTRA_DOC = "usr/share/doc/nspawnctl-test-extra/README"  # left out by --nodocs
WEAK = "nspawnctl-test-weak"  # only recommended by EXTRA: left out without weak deps
RELEASE_PACKAGE = "fedora-release"


@dataclass(frozen=True)
class RpmFile:
    path: str  # inside the root, without the leading /
    content: str
    mode: str = "0644"
    doc: bool = False


@dataclass(frozen=True)
class RpmPackage:
    name: str
    files: tuple[RpmFile, ...] = ()
    recommends: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()  # directories the package owns
    links: tuple[tuple[str, str], ...] = ()  # (path, where the symlink points)


@dataclass(frozen=True)
class RpmRepo:
    path: Path
    packages: tuple[RpmPackage, ...]

    @property
    def url(self) -> str:
        return self.path.as_uri()


OS_RELEASE = RpmFile(
    "etc/os-release", 'NAME="nspawnctl test"\nID=nspawnctl-test\nID_LIKE=fedora\nVERSION_ID=40\n'
)
PACKAGES = (
    *(RpmPackage(name) for name in BASE_PACKAGES if name != "systemd"),
    # Not booted here; it only has to exist where the image store looks for it.
    RpmPackage("systemd", (RpmFile("usr/lib/systemd/systemd", "#!/bin/sh\nexit 0\n", "0755"),)),
    RpmPackage(
        RELEASE_PACKAGE,
        (OS_RELEASE,),
        # In Fedora 36 and later the rpm package owns it; the rpm database belongs there.
        dirs=("usr/lib/sysimage/rpm",),
    ),
    RpmPackage(
        EXTRA,
        (RpmFile(EXTRA_FILE, "hello from an rpm\n"), RpmFile(EXTRA_DOC, "docs\n", doc=True)),
        recommends=(WEAK,),
    ),
    RpmPackage(WEAK, (RpmFile("usr/share/nspawnctl-test-weak/weak", "weak\n"),)),
)


def unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: dnf --installroot installs files owned by root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (scripts/setup.sh installs them)"
    return None


# Imported by the test modules under the *_fixture names, so that a test's parameter
# does not shadow an imported name.
@pytest.fixture(scope="session", name="rpm_tools")
def rpm_tools_fixture() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session", name="rpm_repo")
def rpm_repo_fixture(rpm_tools: None, tmp_path_factory: pytest.TempPathFactory) -> RpmRepo:
    return build_repo(tmp_path_factory.mktemp("rpm-repo"), PACKAGES)


def build_repo(directory: Path, packages: tuple[RpmPackage, ...]) -> RpmRepo:
    """Build `packages` with one spec (one subpackage each, one rpmbuild run) and index
    them; the repository is `directory`/repo."""
    top = directory / "rpmbuild"
    for sub in ("SPECS", "SOURCES", "tmp"):
        (top / sub).mkdir(parents=True)
    spec = top / "SPECS/nspawnctl-test.spec"
    spec.write_text(_spec(packages, top / "SOURCES"))
    run(
        [
            "rpmbuild",
            "-bb",
            "--quiet",
            "--define",
            f"_topdir {top}",
            # Debian's rpmbuild writes its scripts to /var/tmp otherwise.
            "--define",
            f"_tmppath {top / 'tmp'}",
            spec,
        ]
    )
    repo = directory / "repo"
    shutil.copytree(top / "RPMS", repo)
    run(["createrepo_c", "--quiet", repo])
    return RpmRepo(repo, packages)


def _spec(packages: tuple[RpmPackage, ...], sources: Path) -> str:
    # The main package has no %files, so rpmbuild makes only the subpackages.
    head = [
        "Name: nspawnctl-test",
        "Version: 1",
        "Release: 1",
        "Summary: nspawnctl tests",
        "License: MIT",
        "BuildArch: noarch",
        "",
        "%description",
        "nspawnctl tests",
        "",
    ]
    subpackages: list[str] = []
    install = ["%install"]
    files: list[str] = []
    for package in packages:
        subpackages += [
            f"%package -n {package.name}",
            f"Summary: {package.name} for the nspawnctl tests",
            # Else rpmbuild makes the script require /bin/sh, which nothing here provides.
            "AutoReqProv: no",
            *(f"Recommends: {name}" for name in package.recommends),
            f"%description -n {package.name}",
            f"{package.name} for the nspawnctl tests",
            "",
        ]
        files.append(f"%files -n {package.name}")
        for directory in package.dirs:
            install.append(f"mkdir -p %{{buildroot}}/{directory}")
            files.append(f"%dir /{directory}")
        for file in package.files:
            source = sources / f"{package.name}-{len(install)}"
            source.write_text(file.content)
            install.append(f"install -D -m {file.mode} {source} %{{buildroot}}/{file.path}")
            files.append(f"{'%doc ' if file.doc else ''}/{file.path}")
        for path, points_to in package.links:
            install.append(f"mkdir -p $(dirname %{{buildroot}}/{path})")
            install.append(f"ln -s {points_to} %{{buildroot}}/{path}")
            files.append(f"/{path}")
        files.append("")
    return "\n".join([*head, *subpackages, *install, "", *files])
