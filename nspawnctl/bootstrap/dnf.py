"""Fedora, CentOS Stream, Rocky Linux and AlmaLinux images with `dnf --installroot`.

Written for dnf 4 (Debian 12 ships 4.14); dnf5, the `dnf` of Fedora 41 and later, takes
other options and is not supported yet.

Nothing of the host's dnf setup is used: not its dnf.conf, not its repositories (on a
Fedora host they would be the wrong release, on Debian there are none), not its
plugins. The image is built from exactly one repository, `recipe.mirror` or the
distribution's official one (for CentOS, Rocky and AlmaLinux that is BaseOS only, so
`packages:` from AppStream need a `mirror:` that has them).

Signatures: packages from a network mirror are checked, so dnf needs the distribution's
GPG key. dnf imports keys only from the repository's `gpgkey=`, so we point it at the
key file on this host (`/etc/pki/rpm-gpg` on a Fedora-family host, or the
distribution-gpg-keys package); `check()` fails early when there is none. A recipe
cannot give a key of its own yet, and keys are never fetched from the network (that
would trust whatever the network says the key is). A `file://` mirror is not checked,
see `_gpg_options`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from nspawnctl.bootstrap import Bootstrapper, Progress
from nspawnctl.errors import OperationError
from nspawnctl.guesttree import delete
from nspawnctl.recipe import Recipe
from nspawnctl.run import run

# What every guest needs to boot and be reached, by their Fedora names:
BASE_PACKAGES = (
    "systemd",  # init: the container boots /usr/lib/systemd/systemd
    "dbus",  # the system bus, for machinectl and systemctl from the host
    "openssh-server",  # sshd, started per connection on the passed socket
    "iproute",  # ip(8), to see and set up the guest's network
    # glibc needs some langpack; left to choose, dnf may take glibc-all-langpacks
    # (over 200 MB) where the minimal one (C and C.UTF-8 only) is enough.
    "glibc-minimal-langpack",
    # What the tools people point at an SSH server expect: python3 (Ansible's
    # modules), rsync, an editor; shutdown and reboot come with systemd.
    "python3",
    "rsync",
    "vim-minimal",
)
# The repository's name for dnf; also the prefix of its per-repository options.
REPO_ID = "nspawnctl"
# Where the distribution keys live on a host that has them: a Fedora-family host's
# own, then the distribution-gpg-keys package (a subdirectory per distribution).
GPG_KEY_DIRS = (Path("/etc/pki/rpm-gpg"), Path("/usr/share/distribution-gpg-keys"))


@dataclass(frozen=True)
class _Distro:
    # The package with /etc/os-release (which the image store requires) and the
    # guest's own repository files.
    release_package: str
    # `$releasever` and `$basearch` are left for dnf to expand.
    mirror: str
    release: re.Pattern[str]
    release_example: str
    # Names of the key file, formatted with `release` and `major`; searched in
    # GPG_KEY_DIRS[0] and in GPG_KEY_DIRS[1]/keys_subdir.
    keys: tuple[str, ...]
    keys_subdir: str


_DISTROS = {
    "fedora": _Distro(
        "fedora-release",
        "https://dl.fedoraproject.org/pub/fedora/linux/releases/$releasever/Everything/$basearch/os/",
        re.compile(r"[1-9][0-9]*"),
        "40",
        ("RPM-GPG-KEY-fedora-{release}-primary",),
        "fedora",
    ),
    "centos": _Distro(
        "centos-stream-release",
        "https://mirror.stream.centos.org/$releasever-stream/BaseOS/$basearch/os/",
        re.compile(r"[1-9][0-9]*"),
        "9",
        (
            "RPM-GPG-KEY-centosofficial-SHA256",
            "RPM-GPG-KEY-centosofficial",
            "RPM-GPG-KEY-CentOS-Official-SHA256",
            "RPM-GPG-KEY-CentOS-Official",
        ),
        "centos",
    ),
    "rocky": _Distro(
        "rocky-release",
        "https://dl.rockylinux.org/pub/rocky/$releasever/BaseOS/$basearch/os/",
        re.compile(r"[1-9][0-9]*(\.[0-9]+)?"),
        "9",
        ("RPM-GPG-KEY-Rocky-{major}",),
        "rocky",
    ),
    "almalinux": _Distro(
        "almalinux-release",
        "https://repo.almalinux.org/almalinux/$releasever/BaseOS/$basearch/os/",
        re.compile(r"[1-9][0-9]*(\.[0-9]+)?"),
        "9",
        ("RPM-GPG-KEY-AlmaLinux-{major}",),
        "alma",
    ),
}


class Dnf(Bootstrapper):
    method = "dnf"

    def check(self, recipe: Recipe) -> None:
        dnf_program()
        distro = _distro(recipe)
        if not distro.release.fullmatch(recipe.release):
            raise OperationError(
                f"{recipe.release!r} is not a {recipe.distro} release",
                hint=f"e.g. {recipe.distro}:{distro.release_example}",
            )
        url = mirror_url(recipe)
        local = local_path(url)
        if local is not None:
            _check_local_repository(url, local)
        elif not gpg_keys(recipe):
            names = ", ".join(
                k.format(release=recipe.release, major=_major(recipe)) for k in distro.keys
            )
            raise OperationError(
                f"no GPG key for {recipe.image} on this host: dnf could not check the "
                f"packages from {url}",
                hint=f"put the distribution's key ({names}) into {GPG_KEY_DIRS[0]}, or "
                "install distribution-gpg-keys, or use a file:// mirror",
            )

    def build(self, recipe: Recipe, target: Path, progress: Progress) -> None:
        packages = dict.fromkeys(
            (*BASE_PACKAGES, _distro(recipe).release_package, *recipe.packages)
        )
        target.mkdir(mode=0o755)
        with tempfile.TemporaryDirectory(prefix="nspawnctl-dnf-") as tmp:
            run([*dnf_command(recipe, target, Path(tmp)), "install", *packages], progress=progress)
        _move_rpmdb(target)
        _remove_dnf_leftovers(target)


def dnf_command(recipe: Recipe, target: Path, scratch: Path) -> list[str | Path]:
    """`dnf` and its options for `recipe` into `target`, up to the dnf command."""
    url = mirror_url(recipe)
    # An empty dnf.conf, so that the host's is not read (dnf reads it when the
    # installroot has none); an empty repository directory, so that no host
    # repository is used; only then our one repository.
    config = scratch / "dnf.conf"
    config.write_text("[main]\n")
    (scratch / "repos.d").mkdir()
    return [
        dnf_program(),
        f"--installroot={target}",
        f"--releasever={recipe.release}",
        f"--config={config}",
        f"--setopt=reposdir={scratch / 'repos.d'}",
        # A host's plugins (subscription-manager, versionlock, ...) are about the host.
        "--noplugins",
        f"--repofrompath={REPO_ID},{url}",
        f"--repo={REPO_ID}",
        # The cache and the logs: dnf 4 keeps them inside the installroot
        # (var/cache/dnf, var/log), where _remove_dnf_leftovers removes them. Not
        # --setopt=cachedir/logdir: given on the command line, dnf 4.14 uses the
        # path inside the installroot for some files and on the host for others
        # (repository metadata, hawkey.log).
        "--setopt=keepcache=False",
        "--setopt=install_weak_deps=False",
        "--nodocs",
        "-y",
        *_gpg_options(recipe, url),
    ]


def _gpg_options(recipe: Recipe, url: str) -> list[str]:
    if local_path(url) is not None:
        # A local directory's packages are as trustworthy as the host's own files
        # (only root can have put them where root's nspawnctl reads them), and are
        # usually built locally, unsigned, with no key to check them against.
        return ["--nogpgcheck"]
    # Said explicitly: our empty dnf.conf would leave gpgcheck at dnf's default, off.
    keys = " ".join(key.as_uri() for key in gpg_keys(recipe))
    return [f"--setopt={REPO_ID}.gpgcheck=True", f"--setopt={REPO_ID}.gpgkey={keys}"]


def dnf_program() -> str:
    """dnf 4's command: `dnf`, or `dnf4` where `dnf` is dnf5 (Fedora 41 and later)."""
    for name in ("dnf4", "dnf"):
        path = shutil.which(name)
        if path is not None and not Path(path).resolve().name.startswith("dnf5"):
            return name
    if shutil.which("dnf") is not None:
        raise OperationError(
            "this host's dnf is dnf5; nspawnctl needs dnf 4",
            hint="install dnf 4 (the dnf4 command)",
        )
    raise OperationError("dnf is not installed", hint="apt-get install dnf")


def mirror_url(recipe: Recipe) -> str:
    """The repository URL; a plain absolute path is a local repository."""
    mirror = recipe.mirror or _distro(recipe).mirror
    if mirror.startswith("/"):
        return Path(mirror).as_uri()
    if "://" not in mirror:
        raise OperationError(
            f"mirror {mirror!r} is neither a URL nor an absolute path",
            hint="e.g. file:///srv/fedora/40 or https://mirror.example/fedora/",
        )
    return mirror


def local_path(url: str) -> Path | None:
    """The directory of a file:// URL, None for a network URL."""
    parsed = urllib.parse.urlsplit(url)
    return Path(urllib.parse.unquote(parsed.path)) if parsed.scheme == "file" else None


def gpg_keys(recipe: Recipe, dirs: tuple[Path, ...] = GPG_KEY_DIRS) -> list[Path]:
    """The distribution's key files that this host has, in `dirs` (see GPG_KEY_DIRS)."""
    distro = _distro(recipe)
    names = [k.format(release=recipe.release, major=_major(recipe)) for k in distro.keys]
    found: list[Path] = []
    for directory in (dirs[0], *(d / distro.keys_subdir for d in dirs[1:])):
        found.extend(directory / name for name in names if (directory / name).is_file())
    return found


def _check_local_repository(url: str, path: Path) -> None:
    if "$" in str(path):
        return  # variables only dnf can expand; dnf says what is missing
    if not path.is_dir():
        raise OperationError(f"mirror {url}: {path} does not exist")
    if not (path / "repodata/repomd.xml").is_file():
        raise OperationError(
            f"mirror {url} is not a dnf repository: no repodata/repomd.xml in {path}",
            hint=f"index its packages: createrepo_c {path}",
        )


def _distro(recipe: Recipe) -> _Distro:
    try:
        return _DISTROS[recipe.distro]
    except KeyError:
        raise OperationError(
            f"the dnf method cannot build {recipe.distro!r}",
            hint="it builds " + ", ".join(_DISTROS),
        ) from None


def _major(recipe: Recipe) -> str:
    return recipe.release.split(".")[0]


def _move_rpmdb(target: Path) -> None:
    """Debian's rpm keeps its database in ~/.rpmdb (https://bugs.debian.org/1004863), so
    dnf on a Debian host writes it to TARGET/root/.rpmdb (`run` passes no HOME: `~` is
    root's home from passwd), where the guest's own rpm never looks. Move it to where
    the guest's rpm does: /usr/lib/sysimage/rpm if the guest's packages made that
    (Fedora 36 and later), else /var/lib/rpm."""
    home_db = target / "root/.rpmdb"
    if not home_db.is_dir() or home_db.is_symlink():
        return  # a host whose rpm already uses the standard place
    db = _inside(target, "usr/lib/sysimage/rpm")
    if not db.is_dir():
        db = _inside(target, "var/lib/rpm")
    db.mkdir(mode=0o755, parents=True, exist_ok=True)
    for entry in home_db.iterdir():
        os.replace(entry, db / entry.name)
    home_db.rmdir()


def _remove_dnf_leftovers(target: Path) -> None:
    """What dnf leaves only for itself: repository metadata and its logs. /var/lib/dnf,
    the guest's package history, stays."""
    delete(_inside(target, "var/cache/dnf"))
    logs = _inside(target, "var/log")
    for leftover in (*logs.glob("dnf*.log"), logs / "hawkey.log"):
        leftover.unlink(missing_ok=True)


def _inside(target: Path, path: str) -> Path:
    """`target`/`path` with its symlinks resolved, refusing one that leads out of the
    image: the guest's absolute symlinks point into the host here, not into the guest."""
    real = (target / path).resolve()
    if not real.is_relative_to(target.resolve()):
        raise OperationError(
            f"{target / path} leads out of the image, to {real}",
            hint="a package of this image has an absolute symlink there",
        )
    return real
