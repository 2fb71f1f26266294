"""set: change a container's resource limits, live and in its YAML."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml

from nspawnctl import reconcile
from nspawnctl.bus import Systemd
from nspawnctl.commands import add_name, add_verb
from nspawnctl.config import load_yaml, parse_config
from nspawnctl.container import is_running, require_installed
from nspawnctl.errors import ConfigError, Exit, UsageError
from nspawnctl.log import log
from nspawnctl.paths import Paths
from nspawnctl.resources import KEYS, Resources


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "change resource limits (resources.KEY=VALUE) of a container, live"
    p = add_verb(sub, "set", help_text, run_set)
    add_name(p)
    p.add_argument(
        "assignments",
        nargs="+",
        metavar="KEY=VALUE",
        help="e.g. resources.memory=1G resources.cpu=50%%; an empty VALUE removes the limit",
    )


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
    """The new limits go where `apply` puts them, the container's resources drop-in;
    systemd applies them to the running container when it reloads (as it does for an
    `apply` that changes only `resources:`), so one path serves both."""
    name: str = args.name
    require_installed(paths, name)
    changes = dict(map(_assignment, args.assignments))
    file = paths.config_file(name)
    try:
        data = load_yaml(file.read_text(encoding="utf-8"), file)
    except OSError as err:
        raise ConfigError(file, "", f"cannot read: {err}") from None
    config = parse_config(name, data, file)
    resources = config.resources
    for key, value in changes.items():
        try:
            resources = (
                resources.without(key) if value is None else resources.with_value(key, value)
            )
        except ValueError as err:
            raise ConfigError(file, f"resources.{key}", str(err)) from None
    data.pop("resources", None)
    if resources != Resources():
        data["resources"] = resources.yaml_data()
    text = yaml.safe_dump(data, sort_keys=False, width=1000)
    plan = reconcile.plan(paths, dataclasses.replace(config, resources=resources), text)
    with Systemd.connect() as systemd:
        # restart=False: other YAML edits not applied yet wait for the next boot.
        reconcile.carry_out(systemd, plan, restart=False, verb="set")
        live = is_running(systemd, name)
    for key in changes:
        value = resources.yaml_data().get(key, "(no limit)")
        log.info("%s: resources.%s=%s%s", name, key, value, " (live)" if live else "")
    return Exit.OK
