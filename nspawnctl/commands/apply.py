"""apply: make the installed containers match a directory of YAML files."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nspawnctl import container, reconcile
from nspawnctl.bus import Systemd
from nspawnctl.commands import add_file, add_verb
from nspawnctl.config import ContainerConfig, kept_as, load_yaml, parse_config
from nspawnctl.errors import ConfigError, Exit, NspawnctlError, UsageError, from_unexpected
from nspawnctl.install import is_ours
from nspawnctl.names import check_machine_name
from nspawnctl.paths import Paths
from nspawnctl.screen import shown


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "make the installed containers match every NAME.yaml in DIR"
    p = add_verb(sub, "apply", help_text, run_apply)
    add_file(
        p,
        "dir",
        role="config",
        nargs="?",
        type=Path,
        metavar="DIR",
        help="default: the config directory",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show the plan, as a diff of files; change nothing"
    )
    p.add_argument(
        "--prune", action="store_true", help="remove installed containers that DIR does not have"
    )


@dataclass
class _Tally:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # installed, not in DIR, no --prune
    broken: list[str] = field(default_factory=list)  # a YAML that does not load
    failed: list[str] = field(default_factory=list)  # an operation that failed

    def summary(self, dry_run: bool) -> str:
        done = [
            (self.added, "to add" if dry_run else "added"),
            (self.changed, "to change" if dry_run else "changed"),
            (self.restarted, "to restart" if dry_run else "restarted"),
            (self.removed, "to remove" if dry_run else "removed"),
            (self.unchanged, "unchanged"),
            (self.kept, "not in DIR (kept; --prune removes)"),
            (self.broken, "broken YAML"),
            (self.failed, "failed"),
        ]
        if not (self.added or self.changed or self.removed or self.failed):
            return f"nothing to do: {len(self.unchanged)} container(s) up to date" + "".join(
                f"; {len(names)} {what}: {' '.join(names)}" for names, what in done[5:7] if names
            )
        return "; ".join(f"{len(names)} {what}: {' '.join(names)}" for names, what in done if names)


def _report(name: str, err: NspawnctlError, tally: list[str]) -> None:
    print(f"nspawnctl: error: {name}: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)
    tally.append(name)


def _load(paths: Paths, file: Path) -> tuple[ContainerConfig, str]:
    name = file.stem
    try:
        check_machine_name(name)
    except ValueError as err:
        raise ConfigError(file, "name", f"{name!r}: {err}", hint="rename the file") from None
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(file, "", f"cannot read: {err}") from None
    config = parse_config(name, load_yaml(text, file), file)
    return kept_as(config, text, paths.config_file(name))


def installed_names(paths: Paths) -> set[str]:
    """Containers with units on this host, whether or not their YAML is still there."""
    from_units = (
        p.name.removeprefix("nspawnctl-").removesuffix(".socket")
        for p in paths.unit_dir.glob("nspawnctl-*.socket")
        if is_ours(p)
    )
    names = {*container.config_names(paths), *from_units}
    return {n for n in names if container.is_installed(paths, n)}


def run_apply(args: argparse.Namespace, paths: Paths) -> int:
    directory: Path = (args.dir or paths.config_dir).absolute()
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory", hint="nspawnctl apply [DIR]")
    files = sorted(p for p in directory.glob("*.yaml") if not p.name.startswith("."))
    installed = installed_names(paths)
    tally = _Tally()
    for file in files:
        _apply_one(paths, args, file, installed, tally)
    gone = sorted(installed - {f.stem for f in files})
    for name in gone:
        if not args.prune:
            tally.kept.append(name)
            continue
        print(f"- {name}: not in {directory}")
        try:
            if not args.dry_run:
                container.remove(paths, name)
            tally.removed.append(name)
        except NspawnctlError as err:
            _report(name, err, tally.failed)
        except Exception as err:
            _report(name, from_unexpected(err), tally.failed)
    print(tally.summary(args.dry_run))
    if tally.failed:
        return Exit.FAILED
    # A YAML that could not be read: nothing was tried for it.
    return Exit.USAGE if tally.broken else Exit.OK


def _apply_one(
    paths: Paths, args: argparse.Namespace, file: Path, installed: set[str], tally: _Tally
) -> None:
    """One YAML file of the fleet: whatever goes wrong is reported against it alone."""
    name = file.stem
    try:
        config, text = _load(paths, file)
    except NspawnctlError as err:
        _report(name, err, tally.broken)
        return
    try:
        if name not in installed:
            print(f"+ {name}: new container")
            if not args.dry_run:
                container.add(paths, config, text)
            tally.added.append(name)
            return
        plan = reconcile.plan(paths, config, text)
        if plan.kept:
            # The guest's root chose these names' contents, not their names: ours.
            kept = ", ".join(f"/{path}" for path in plan.kept)
            print(f"= {name}: changed in the guest, kept: {kept}")
        if not plan.changes and plan.disk_size is None:
            tally.unchanged.append(name)
            return
        reconcile.check_listens(paths, plan)
        restarts = plan.needs_restart and _running(name)
        _announce(plan, restarts, args.dry_run)
        tally.changed.append(name)
        if args.dry_run:
            if restarts:
                tally.restarted.append(name)
            return
        with Systemd.connect() as systemd:
            if reconcile.carry_out(systemd, plan):
                tally.restarted.append(name)
    except NspawnctlError as err:
        _report(name, err, tally.failed)
    except Exception as err:
        # One container's failure, whatever it is (its guest may have shaped its layer
        # against us), stops only that one.
        _report(name, from_unexpected(err), tally.failed)


def _announce(plan: reconcile.Plan, restarts: bool, dry_run: bool) -> None:
    changed = [str(c.path) for c in plan.changes]
    if plan.disk_size is not None:
        changed.append(f"its disk to {plan.config.resources.yaml_data()['disk']}")
    print(f"~ {plan.name}: " + ", ".join(changed))
    if restarts:
        print(f"  {plan.name} is running and boots with what changed: it will be restarted")
    if dry_run:
        for change in plan.changes:
            # A guest's file holds what its root wrote: shown as text, never as controls.
            diff = change.diff()
            print(diff if change.guest is None else shown(diff, newlines=True), end="")


def _running(name: str) -> bool:
    try:
        with Systemd.connect() as systemd:
            return container.is_running(systemd, name)
    except NspawnctlError:
        return False  # no systemd to ask: a dry run still shows the files
