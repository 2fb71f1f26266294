"""set: change a container's resource limits, live and in its YAML."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import yaml

from nspawnctl import reconcile
from nspawnctl.bus import Systemd
from nspawnctl.commands import add_name
from nspawnctl.config import load_yaml, parse_config
from nspawnctl.container import is_running, require_installed
from nspawnctl.errors import ConfigError, Exit, OperationError, UsageError
from nspawnctl.log import log
from nspawnctl.names import service_unit
from nspawnctl.paths import Paths
from nspawnctl.resources import KEYS, Resources

# Where `SetUnitProperties(runtime=true)` keeps what it set, one file per property.
RUNTIME_CONTROL_DIR = Path("/run/systemd/system.control")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "change resource limits (resources.KEY=VALUE) of a container, live"
    p = sub.add_parser("set", help=help_text, description=help_text)
    add_name(p)
    p.add_argument(
        "assignments",
        nargs="+",
        metavar="KEY=VALUE",
        help="e.g. resources.memory=1G resources.cpu=50%%; an empty VALUE removes the limit",
    )
    p.set_defaults(handler=run_set)


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    section, _dot, name = key.partition(".")
    if not sep or section != "resources" or name not in KEYS:
        raise UsageError(
            f"{text!r}: only resources.{{{','.join(KEYS)}}} can be set",
            hint="for anything else edit the YAML, then `nspawnctl apply`",
        )
    # Read as YAML reads it, so that `tasks=300` is a number and `memory=1G` a size.
    return name, (yaml.safe_load(value) if value else None)


def run_set(args: argparse.Namespace, paths: Paths) -> int:
    name: str = args.name
    require_installed(paths, name)
    changes = dict(map(_assignment, args.assignments))
    file = paths.config_file(name)
    try:
        data = load_yaml(file.read_text(encoding="utf-8"), file)
    except OSError as err:
        raise ConfigError(file, "", f"cannot read: {err}") from None
    old = parse_config(name, data, file).resources
    resources = data.setdefault("resources", {})
    if not isinstance(resources, dict):
        raise ConfigError(file, "resources", "is not a mapping", hint="fix the file first")
    for key, value in changes.items():
        if value is None:
            resources.pop(key, None)
        else:
            resources[key] = value
    if not resources:
        del data["resources"]
    text = yaml.safe_dump(data, sort_keys=False, width=1000)
    config = parse_config(name, data, file)  # every value judged as `add` judges it
    plan = reconcile.plan(paths, config, text)
    with Systemd.connect() as systemd:
        reconcile.carry_out(systemd, plan, restart=False, verb="set")
        live = is_running(systemd, name)
        if live:
            _set_live(systemd, name, config.resources, old, set(changes))
    for key in changes:
        value = dict(config.resources.yaml_data()).get(key, "(no limit)")
        log.info("%s: resources.%s=%s%s", name, key, value, " (live)" if live else "")
    return Exit.OK


def _set_live(systemd: Systemd, name: str, new: Resources, old: Resources, keys: set[str]) -> None:
    """The running container's cgroup gets the new limits now. systemd keeps a copy of
    each in RUNTIME_CONTROL_DIR, which would outrank the drop-in from then on: the
    drop-in says the same, so the copies go, and systemd reads the drop-in again."""
    service = service_unit(name)
    values = dict(new.bus_properties())
    # A limit taken away is back at the unit's default (the stock systemd-nspawn@.service
    # has TasksMax=16384, say), which systemd has read by now.
    properties = [
        (
            KEYS[k].bus_name,
            values.get(KEYS[k].bus_name)
            or int(systemd.unit_property(service, KEYS[k].bus_name, "t")),
        )
        for k in sorted(keys)
        if getattr(new, k) != getattr(old, k)
    ]
    if not properties:
        return
    try:
        systemd.set_properties(service, properties)
    except OperationError as err:
        raise OperationError(
            f"{err.message}; the new limits are written and apply from the next boot",
            hint=f"`nspawnctl restart {name}`",
        ) from None
    control = RUNTIME_CONTROL_DIR / f"{service}.d"
    for key in keys:
        (control / f"50-{KEYS[key].unit_name}.conf").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        control.rmdir()  # only if nothing else is in it
    systemd.reload()
