"""Templates from a root filesystem archive (.tar, .tar.gz, .tar.xz, .tar.zst), like
OpenVZ's template cache: `nspawnctl image export` makes one, so does
`tar -C ROOT --numeric-owner --xattrs --xattrs-include='*' --acls -caf FILE.tar.zst .`

The archive is untrusted input. GNU tar keeps it inside the target by itself: it strips
a leading `/`, refuses member and hard link names containing `..`, and creates a symlink
that is absolute or contains `..` only after every other member is extracted (as a
placeholder file until then), so no member is ever written through one. What tar cannot
know is that the image store later works on the tree from the host: that is what
`refuse_host_symlinks` is for."""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

from nspawnctl.bootstrap import Bootstrapper, Progress
from nspawnctl.errors import OperationError
from nspawnctl.recipe import Recipe
from nspawnctl.run import run

# magic bytes -> (tar option, program tar runs for it)
_COMPRESSIONS = {
    b"\x1f\x8b": ("--gzip", "gzip"),
    b"BZh": ("--bzip2", "bzip2"),
    b"\xfd7zXZ\x00": ("--xz", "xz"),
    b"\x28\xb5\x2f\xfd": ("--zstd", "zstd"),
}
# systemd-nspawn gives every container its own; an archive of a running system has
# its devices and kernel state in them. GNU tar matches excludes against the member
# name as written, before it strips `/` or `./`: each spelling needs its pattern.
# Rarer spellings (`.//dev/x`) get through, and are emptied by the store's sanitize.
_NOT_EXTRACTED = ("dev", "proc", "sys", "run")
_SPELLINGS = ("", "./", "/")
# What `nspawnctl export --full` puts beside the root filesystem (see export.py): its
# manifest and the container's YAML. An image made of such an archive leaves it out.
EXPORT_METADATA = ".nspawnctl-export"
RUNTIME_EXCLUDES = tuple(
    f"--exclude={prefix}{top}/*" for top in _NOT_EXTRACTED for prefix in _SPELLINGS
)
EXCLUDES = (
    *RUNTIME_EXCLUDES,
    *(f"--exclude={prefix}{EXPORT_METADATA}" for prefix in _SPELLINGS),
)
# Directories the image store reads or changes from the host after every build
# (store.finish_rootfs). A symlink on their way that leaves the tree, such as
# etc/ssh -> /etc/ssh, would have it delete the host's own ssh host keys.
_TAR_TRAILERS = (
    "Exiting with failure status",
    "Error is not recoverable",
    "Child returned status",
    "Skipping to next header",
)
_HINT = (
    "give a .tar, .tar.gz, .tar.xz or .tar.zst of a whole root filesystem, e.g. made "
    "with `tar -C ROOT --numeric-owner --xattrs --xattrs-include='*' --acls -caf FILE .`"
)


class Tar(Bootstrapper):
    method = "tar"

    def check(self, recipe: Recipe) -> None:
        archive = _source(recipe)
        if archive.is_dir():
            raise OperationError(
                f"{archive} is a directory, not an archive", hint="use method: directory"
            )
        if not archive.is_file():
            what = "no such file" if not os.path.lexists(archive) else "not a regular file"
            raise OperationError(f"{archive}: {what}", hint=_HINT)
        option, program = compression(archive)
        for tool in ("tar", program):
            if tool and shutil.which(tool) is None:
                raise OperationError(
                    f"{tool} is not installed, {archive} needs it", hint=f"apt-get install {tool}"
                )
        # Python reads no zstd (before 3.14): for .tar.zst the magic bytes must do.
        if option != "--zstd" and not _is_tarfile(archive):
            raise OperationError(f"{archive} is not a tar archive", hint=_HINT)

    def build(self, recipe: Recipe, target: Path, progress: Progress) -> None:
        archive = _source(recipe)
        target.mkdir(mode=0o755)
        extract(archive, target, excludes=EXCLUDES, progress=progress)
        _refuse_nested_tree(target, archive)


# Owners as the archive says, not as this host's /etc/passwd maps the names; every
# extended attribute: security.capability is how ping gets CAP_NET_RAW, and
# trusted.overlay.* is how a container's layer marks what it deleted.
_KEEP = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


def extract(
    archive: Path,
    target: Path,
    members: Sequence[str] = (),
    *,
    excludes: Sequence[str] = (),
    progress: Progress | None = None,
) -> None:
    """Extract `members` (default: all) of `archive` into the existing `target`, owners,
    modes and attributes as the archive has them; OperationError with tar's complaint."""
    option, _program = compression(archive)
    argv: list[str | Path] = [
        "tar",
        "--extract",
        f"--file={archive}",
        *([option] if option else []),
        f"--directory={target}",
        *_KEEP,
        "--same-owner",
        "--preserve-permissions",
        *(["--anchored", *excludes] if excludes else []),  # dev/* is not usr/share/dev/*
        "--",
        *members,
    ]
    # Streamed, even with nobody to show it to: that merges tar's stderr into the output
    # that _tar_error reads.
    proc = run(argv, check=False, progress=progress or (lambda _line: None))
    if proc.returncode != 0:
        raise OperationError(
            f"cannot extract {archive}: {_tar_error(proc.stdout, proc.returncode)}",
            hint=f"see `tar -tvf {archive}`; tar refuses members that would land "
            "outside the target (names with '..', links out of the tree)",
        )


def create(
    target: Path,
    sources: Sequence[tuple[Path, Sequence[str]]],
    *,
    excludes: Sequence[str] = (),
    live: bool = False,
) -> None:
    """Write `target`, compressed as its suffix says (.tar, .tar.gz, .tar.zst...), from
    (directory, members) pairs. It is written as .partial-NAME beside `target` and renamed
    when complete (the partial name keeps the suffix: tar picks the compressor from it).
    `live`: the files may change while tar reads them (a running container's); tar says
    so with exit code 1, which is then no failure."""
    partial = target.with_name(f".partial-{target.name}")
    # Sorted: the same tree makes the same archive, whatever order readdir says.
    # --sparse: holes stay holes (found with SEEK_HOLE), so a guest's 15 TiB sparse file
    # costs nothing to read or to store.
    argv: list[str | Path] = ["tar", *_KEEP, "--sparse", "--sort=name", "--auto-compress"]
    argv.append(f"--file={partial}")
    argv += ["--anchored", *excludes] if excludes else []
    argv += ["--warning=no-file-changed"] if live else []
    argv.append("--create")
    for directory, members in sources:
        argv += ["-C", directory, *members]
    try:
        proc = run(argv, check=False)
        if proc.returncode not in ((0, 1) if live else (0,)):
            raise OperationError(
                f"cannot write {target}: {_tar_error(proc.stderr, proc.returncode)}",
                hint="check that its directory exists and has room",
            )
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _source(recipe: Recipe) -> Path:
    if not recipe.source:
        raise OperationError(f"{recipe.image}: method {recipe.method} needs a source")
    return Path(recipe.source).absolute()


def compression(archive: Path) -> tuple[str, str]:
    """(tar option, program) for the archive's compression; ("", "") if none."""
    try:
        with archive.open("rb") as file:
            head = file.read(8)
    except OSError as err:
        raise OperationError(f"cannot read {archive}: {err.strerror}") from None
    for magic, found in _COMPRESSIONS.items():
        if head.startswith(magic):
            return found
    return "", ""


def _is_tarfile(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except (OSError, EOFError, tarfile.TarError):  # damaged compression
        return False


def _tar_error(output: str, code: int) -> str:
    """tar's last complaint, not its closing lines that only say there were some."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not any(s in ln for s in _TAR_TRAILERS)]
    return errors[-1] if errors else f"tar exit code {code}"


def _refuse_nested_tree(target: Path, archive: Path) -> None:
    """An archive of a directory holding the tree (rootfs/etc/...) instead of the tree
    itself is an easy mistake; say so instead of "has no /etc/os-release"."""
    if _has_os_release(target):
        return
    entries = [e for e in target.iterdir() if e.name not in _NOT_EXTRACTED]
    if len(entries) == 1 and entries[0].is_dir() and _has_os_release(entries[0]):
        top = entries[0].name
        raise OperationError(
            f"{archive} holds a root filesystem in its directory {top}/, not at its top",
            hint=f"make the archive inside that directory: tar -C {top} ... -caf FILE .",
        )


def _has_os_release(root: Path) -> bool:
    return any(os.path.lexists(root / p) for p in ("etc/os-release", "usr/lib/os-release"))
