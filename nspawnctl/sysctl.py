"""The kernel limits a host of many containers needs, kept in a sysctl.d file of
nspawnctl's so that the host's boot (systemd-sysctl) sets them, and raised at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nspawnctl.atomic import same_text, write_atomic
from nspawnctl.install import is_ours
from nspawnctl.log import log
from nspawnctl.paths import Paths
from nspawnctl.render import GENERATED_MARK

FILE_NAME = "60-nspawnctl.conf"

# What one running container takes of a limit, to say when a host cannot raise it
# and is short (measured: a guest's systemd, journald and logind take about 5).
_INOTIFY_PER_CONTAINER = 5


@dataclass(frozen=True)
class Limit:
    key: str  # as sysctl.d(5) names it
    value: int
    per_container: int
    why: str

    @property
    def proc_path(self) -> str:
        return self.key.replace(".", "/")


LIMITS = (
    Limit(
        "fs.inotify.max_user_instances",
        8192,
        _INOTIFY_PER_CONTAINER,
        # The kernel charges the inotify instances of every user namespace to the user
        # that made it, the host's root: past the default 128, a booting guest's
        # systemd fails ("Too many open files") and its first connection waits in vain.
        "every guest's inotify instances count against the host root's",
    ),
)


def text() -> str:
    lines = [f"{GENERATED_MARK}its containers' needs: read by systemd-sysctl at every boot"]
    for limit in LIMITS:
        lines += [f"# {limit.why}", f"{limit.key} = {limit.value}"]
    return "\n".join(lines) + "\n"


def raise_limits(paths: Paths, containers: int, proc: Path = Path("/proc/sys")) -> None:
    """Keep the file, and raise each limit now where the kernel has less (never lower
    one the admin raised further). Where /proc/sys is read-only (a container host),
    warn only if the containers defined here need more than the kernel allows. Never
    fails: it runs once the container is added."""
    path = paths.sysctl_dir / FILE_NAME
    if path.exists() and not is_ours(path):
        log.info("%s is not nspawnctl's: the kernel limits in it are the admin's", path)
    elif not same_text(path, text()):
        try:
            write_atomic(path, text())
        except OSError as err:
            # The container is added by now: this is advice to the host, not its failure.
            log.warning("cannot keep the kernel limits in %s: %s", path, err.strerror or err)
    for limit in LIMITS:
        _raise(limit, containers, proc / limit.proc_path)


def _raise(limit: Limit, containers: int, proc_file: Path) -> None:
    try:
        current = int(proc_file.read_text())
    except (OSError, ValueError):
        return  # a kernel without it: nothing to raise
    if current >= limit.value:
        return
    try:
        proc_file.write_text(f"{limit.value}\n")
    except OSError as err:
        if containers * limit.per_container > current:
            log.warning(
                "%s is %d, short for %d containers, and cannot be raised here (%s): "
                "set it on the host, as nspawnctl(1) says",
                limit.key,
                current,
                containers,
                err.strerror,
            )
