"""add and render: both turn NAME [-f FILE] [--image/--ssh/--key] into a configuration."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nspawnctl import container
from nspawnctl.commands import add_file, add_name, add_verb
from nspawnctl.config import (
    ContainerConfig,
    dump_config,
    kept_as,
    load_config,
    load_yaml,
    parse_config,
)
from nspawnctl.errors import ConfigError, Exit, UsageError
from nspawnctl.log import log
from nspawnctl.paths import Paths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for verb, handler, help_text in (
        ("add", run_add, "create a container and start its socket (the container is not booted)"),
        ("render", run_render, "print every file `add` would write, touching nothing"),
    ):
        p = add_verb(sub, verb, help_text, handler)
        if verb == "add":
            p.add_argument(
                "--check",
                action="store_true",
                help="only check that it could be added here (name, ports); change nothing",
            )
        add_name(p)
        add_file(
            p,
            "-f",
            "--file",
            role="input",
            type=Path,
            metavar="FILE",
            help="the container's YAML (default: CONFIG_DIR/NAME.yaml)",
        )
        p.add_argument(
            "--image", metavar="IMAGE", help="distro:release (debian:bookworm) or template:NAME"
        )
        p.add_argument("--ssh", metavar="PORT", help="host port or ADDRESS:PORT for SSH")
        add_file(
            p,
            "--key",
            role="key",
            action="append",
            default=[],
            metavar="PUBKEY",
            help="authorized public key (a key line or a .pub file); repeatable",
        )


_MAX_FILE = 1 << 20


def resolve(args: argparse.Namespace, paths: Paths) -> tuple[ContainerConfig, str]:
    """The configuration asked for, and the YAML text to keep in the config directory."""
    name: str = args.name
    config_path = paths.config_file(name)
    flags = args.image is not None or args.ssh is not None or bool(args.key)
    if args.file and flags:
        raise UsageError(
            "-f FILE and --image/--ssh/--key do not mix",
            hint="put everything in the file, or give only options",
        )
    if args.file:
        try:
            with args.file.open(encoding="utf-8") as f:
                # At most 1 MiB: a device such as /dev/zero would be read forever.
                text = f.read(_MAX_FILE + 1)
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(args.file, "", f"cannot read: {err}") from None
        if len(text) > _MAX_FILE:
            raise ConfigError(args.file, "", "is larger than 1 MiB: not a container's YAML")
        config = parse_config(name, load_yaml(text, args.file), args.file)
        return kept_as(config, text, config_path)
    if flags:
        if config_path.exists():
            raise UsageError(
                f"{config_path} exists already; options would replace it",
                hint=f"edit it, then run `nspawnctl {args.verb} {name}` alone",
            )
        ssh: dict[str, object] = {"authorized_keys": args.key}
        if args.ssh is not None:
            ssh["listen"] = args.ssh
        try:
            config = parse_config(
                name, {"image": args.image or "debian:bookworm", "ssh": ssh}, Path("options")
            )
        except ConfigError as err:
            raise _as_option_error(err) from None
        config = dataclasses.replace(config, source=config_path)
        return config, dump_config(config)
    if not config_path.exists():
        raise UsageError(
            f"no configuration for {name!r}",
            hint=f"write {config_path}, or give `--ssh PORT --key PUBKEY`",
        )
    return load_config(name, config_path), config_path.read_text(encoding="utf-8")


_OPTION_OF_KEY = {"image": "--image", "ssh.listen": "--ssh", "ssh.authorized_keys": "--key"}


def _as_option_error(err: ConfigError) -> UsageError:
    """A configuration built from options is wrong: name the option, not a YAML key."""
    option = next((o for k, o in _OPTION_OF_KEY.items() if err.key.startswith(k)), err.key)
    hint = f"give {option}" if err.problem == "is required" else err.hint
    return UsageError(f"{option}: {err.problem}", hint=hint)


def run_add(args: argparse.Namespace, paths: Paths) -> int:
    config, text = resolve(args, paths)
    if args.check:
        container.check_addable(paths, config)
        log.info("%s can be added here", config.name)
        return Exit.OK
    container.add(paths, config, text)
    return Exit.OK


def run_render(args: argparse.Namespace, paths: Paths) -> int:
    config, _text = resolve(args, paths)
    rendering = container.rendering_for(paths, config)
    for file in rendering.all_files(paths.machine_dir(config.name)):
        print(f"# {file.path}")
        print(file.text, end="" if file.text.endswith("\n") or not file.text else "\n")
        print()
    return Exit.OK
