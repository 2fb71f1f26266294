"""The host's kernel limits: kept in nspawnctl's sysctl.d file, raised, never lowered."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nspawnctl import sysctl
from nspawnctl.paths import Paths
from nspawnctl.render import GENERATED_MARK

INOTIFY = "fs/inotify/max_user_instances"


def host(tmp_path: Path, inotify: int) -> tuple[Paths, Path]:
    paths = Paths.from_env({"NSPAWNCTL_SYSCTL_DIR": str(tmp_path / "sysctl.d")})
    proc = tmp_path / "proc"
    (proc / INOTIFY).parent.mkdir(parents=True)
    (proc / INOTIFY).write_text(f"{inotify}\n")
    return paths, proc


def test_a_low_limit_is_raised_and_kept_for_the_next_boot(tmp_path: Path) -> None:
    paths, proc = host(tmp_path, 128)
    sysctl.raise_limits(paths, containers=1, proc=proc)
    assert (proc / INOTIFY).read_text() == "8192\n"
    kept = (paths.sysctl_dir / sysctl.FILE_NAME).read_text()
    assert "\nfs.inotify.max_user_instances = 8192\n" in kept
    assert kept.startswith(GENERATED_MARK)


def test_a_limit_the_admin_raised_further_stays(tmp_path: Path) -> None:
    paths, proc = host(tmp_path, 100000)
    sysctl.raise_limits(paths, containers=1, proc=proc)
    assert (proc / INOTIFY).read_text() == "100000\n"


def test_the_file_is_written_once(tmp_path: Path) -> None:
    paths, proc = host(tmp_path, 128)
    sysctl.raise_limits(paths, containers=1, proc=proc)
    kept = paths.sysctl_dir / sysctl.FILE_NAME
    inode = kept.stat().st_ino
    sysctl.raise_limits(paths, containers=2, proc=proc)
    assert kept.stat().st_ino == inode


def test_the_admins_own_file_of_that_name_is_left_alone(tmp_path: Path) -> None:
    paths, proc = host(tmp_path, 128)
    mine = paths.sysctl_dir / sysctl.FILE_NAME
    mine.parent.mkdir()
    mine.write_text("fs.inotify.max_user_instances = 512\n")
    sysctl.raise_limits(paths, containers=1, proc=proc)
    assert mine.read_text() == "fs.inotify.max_user_instances = 512\n"


def test_a_limit_that_cannot_be_raised_warns_only_when_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A read-only sysctl, as /proc/sys is in a container host: root may not write it.
    fixed = Path("/proc/sys/kernel/ngroups_max")
    current = int(fixed.read_text())
    limit = sysctl.Limit("kernel.ngroups_max", current + 1, 1, "a test")
    with caplog.at_level(logging.WARNING, logger="nspawnctl"):
        sysctl._raise(limit, current, fixed)
        assert not caplog.records
        sysctl._raise(limit, current + 1, fixed)
    assert "kernel.ngroups_max" in caplog.text and f"short for {current + 1}" in caplog.text


def test_a_file_that_cannot_be_written_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths, proc = host(tmp_path, 128)
    paths.sysctl_dir.parent.mkdir(exist_ok=True)
    paths.sysctl_dir.write_text("a file where the directory should be\n")
    with caplog.at_level(logging.WARNING, logger="nspawnctl"):
        sysctl.raise_limits(paths, containers=1, proc=proc)
    assert "cannot keep the kernel limits" in caplog.text
    assert (proc / INOTIFY).read_text() == "8192\n"  # raised all the same
