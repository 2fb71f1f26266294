"""Where nspawnctl reads and writes. Every directory can be moved with an environment
variable, so tests and demos run against a private root instead of the real host."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# (attribute, environment variable, default) - the one table of locations.
_LOCATIONS = (
    ("config_dir", "NSPAWNCTL_CONFIG_DIR", "/etc/nspawnctl"),
    ("machines_dir", "NSPAWNCTL_MACHINES_DIR", "/var/lib/machines"),
    ("unit_dir", "NSPAWNCTL_UNIT_DIR", "/etc/systemd/system"),
    ("nspawn_dir", "NSPAWNCTL_NSPAWN_DIR", "/etc/systemd/nspawn"),
    ("network_dir", "NSPAWNCTL_NETWORK_DIR", "/etc/systemd/network"),
    ("sysctl_dir", "NSPAWNCTL_SYSCTL_DIR", "/etc/sysctl.d"),
    ("state_dir", "NSPAWNCTL_STATE_DIR", "/var/lib/nspawnctl"),
    ("journal_dir", "NSPAWNCTL_JOURNAL_DIR", "/var/log/journal"),
)


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    machines_dir: Path
    unit_dir: Path
    nspawn_dir: Path
    network_dir: Path
    sysctl_dir: Path
    state_dir: Path
    journal_dir: Path

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, config_dir: Path | None = None
    ) -> Paths:
        env = os.environ if environ is None else environ
        values = {attr: Path(env.get(var) or default) for attr, var, default in _LOCATIONS}
        if config_dir is not None:
            values["config_dir"] = config_dir
        # Units name these paths, and systemd takes only absolute, normalized ones
        # (SourcePath=/etc/x/../nspawnctl/web.yaml is ignored: "not normalized").
        values = {attr: Path(os.path.normpath(path.absolute())) for attr, path in values.items()}
        return cls(**values)

    @property
    def image_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def layers_dir(self) -> Path:
        """Every container's own layer (layers.py)."""
        return self.state_dir / "layers"

    @property
    def snapshots_dir(self) -> Path:
        """Every container's snapshots, a directory each (backup.py)."""
        return self.state_dir / "snapshots"

    @property
    def intent_dir(self) -> Path:
        """Records of changes in progress (intent.py)."""
        return self.state_dir / "intents"

    def private_dirs(self) -> tuple[Path, ...]:
        """Directories only root may enter: they hold guests' trees, whose set-uid files
        and devices are the guests' (systemd keeps /var/lib/machines at 0700 likewise)."""
        state = self.state_dir
        return (state, self.image_dir, self.layers_dir, self.snapshots_dir, self.machines_dir)

    def hold_file(self, name: str) -> Path:
        """The lock of a container's boot gate (hold.py). On disk, in root's own state,
        and never replaced: it must be there at every boot, and be the same inode for
        the gate and for nspawnctl."""
        return self.state_dir / "hold" / name

    def config_file(self, name: str) -> Path:
        return self.config_dir / f"{name}.yaml"

    def machine_dir(self, name: str) -> Path:
        return self.machines_dir / name

    def environment(self) -> dict[str, str]:
        """The variables that make another nspawnctl (one a unit runs) use these
        locations: those that are not the defaults."""
        return {
            var: str(getattr(self, attr))
            for attr, var, default in _LOCATIONS
            if getattr(self, attr) != Path(default)
        }


def environment_variables() -> dict[str, str]:
    """The variable of each location, for --help and the man page test."""
    return {var: default for _attr, var, default in _LOCATIONS}


def make_private(paths: Paths) -> None:
    """Make the state directory if there is none, and every private directory 0700 (an
    earlier nspawnctl left them 0755, any user could reach a guest's set-uid root files)."""
    if os.geteuid() != 0:
        return  # a read-only verb run by a user: nothing to make or change
    paths.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for directory in paths.private_dirs():
        with contextlib.suppress(FileNotFoundError):
            if os.stat(directory).st_mode & 0o077:
                os.chmod(directory, 0o700)
