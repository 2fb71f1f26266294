"""YAML -> typed, frozen model, validated once. Nothing past this module sees a raw dict.

Every key of the YAML is a field below, with its row (schema.py): how it is read, its
default, and how it is written back."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from nspawnctl.errors import ConfigError
from nspawnctl.listen import Listen
from nspawnctl.names import check_hostname, check_machine_name
from nspawnctl.pubkeys import read_public_keys
from nspawnctl.recipe import PACKAGE_RE, BootstrapError, Recipe, parse_image, with_bootstrap
from nspawnctl.resources import KEYS as RESOURCE_KEYS
from nspawnctl.resources import Resources
from nspawnctl.schema import (
    PLANNED_KEYS,
    Parse,
    Section,
    dump_mapping,
    key,
    keys_of,
    known_keys,
    mapping,
    mappings,
    parse_mapping,
)
from nspawnctl.security import Security, capability_name
from nspawnctl.yamlfile import load_yaml, type_name

__all__ = ["KNOWN_KEYS", "PLANNED_KEYS", "load_yaml"]

# systemd's own default stop timeout is 90 s; the guest's quiesce comes before this.
STOP_TIMEOUT = 60
# systemd time spans as the YAML may give them: 90, "90s", "10min", "1h 30min".
_SPAN_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
_SPAN_RE = re.compile(r"(\d+)\s*(min|sec|hr|s|m|h|d|)\s*")
# keep_awake names go to a guest script on a unit's command line, where systemd would
# unescape a backslash: plain service names only. A socket is always active.
_SERVICE_RE = re.compile(r"^[A-Za-z0-9:_.@-]+\.service\Z")
# A unit name as systemd takes it: one '@' at most and never a bare template (a@.service);
# at most 253 characters, so that its drop-in directory NAME.d is a valid file name.
# `\Z`, not `$`: `$` also matches before a trailing newline.
_UNIT_RE = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]+)?\.(service|socket)\Z"
)
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,12}\Z")
_BOOTSTRAP_KEYS = ("method", "mirror", "packages", "source")


class NetworkMode(StrEnum):
    PRIVATE = "private"
    HOST = "host"
    VETH = "veth"
    ZONE = "zone"
    BRIDGE = "bridge"


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


# Parsers of one key's value, for the rows below: (section, key) -> value.


def integer(least: int, most: int, *, hint: str) -> Parse:
    def parse(section: Section, name: str) -> int:
        value: int = section.take(name, int)
        if not least <= value <= most:
            section.fail(name, f"{value!r}: is not between {least} and {most}", hint=hint)
        return value

    return parse


def span(least: int, *, hint: str) -> Parse:
    """A time span of `least` seconds to 7 days."""

    def parse(section: Section, name: str) -> int:
        value = section.take(name, int, str)
        text = str(value).strip()
        seconds, end = 0, 0
        for match in _SPAN_RE.finditer(text):
            if match.start() != end:
                break
            # Ten digits are past 7 days in any unit; and int() refuses more than 4300.
            if len(match.group(1).lstrip("0")) >= 10:
                section.fail(
                    name, f"{value!r} is longer than 7 days", hint="e.g. 90, 30s, 10min, 1h 30min"
                )
            seconds += int(match.group(1)) * _SPAN_UNITS[match.group(2)]
            end = match.end()
        if not text or end != len(text):
            section.fail(
                name, f"{value!r} is not a time span", hint="e.g. 90, 30s, 10min, 1h 30min"
            )
        if not least <= seconds <= 7 * 86400:
            section.fail(name, f"{value!r} is {seconds} s: expected {least} s to 7 days", hint=hint)
        return seconds

    return parse


def _seconds(value: int) -> str:
    return f"{value}s"


def _port(section: Section, name: str) -> int:
    value: int = section.take(name, int)
    if not 1 <= value <= 65535:
        section.fail(name, f"{value!r} is not a port (expected 1-65535)")
    return value


def _unit_name(suffix: str, example: str) -> Parse:
    def parse(section: Section, name: str) -> str:
        value: str = section.take(name, str)
        if not _UNIT_RE.match(value) or not value.endswith(suffix):
            kind = suffix.removeprefix(".")
            section.fail(name, f"{value!r} is not a {kind} unit name", hint=f"e.g. {example}")
        return value

    return parse


def _listen(section: Section, name: str) -> Listen:
    raw = section.take(name, int, str, required=True)
    try:
        return Listen.parse(raw)
    except ValueError as err:
        section.fail(
            name,
            f"{raw!r}: {err}",
            hint="a port (2222) or ADDRESS:PORT (127.0.0.1:2222, [::1]:2222)",
        )


def _authorized_keys(section: Section, name: str) -> tuple[str, ...]:
    raw_keys = section.take(name, list, required=True)
    keys: list[str] = []
    for index, entry in enumerate(raw_keys):
        where = f"{name}[{index}]"
        if not isinstance(entry, str):
            section.fail(where, f"{entry!r} is a {type_name(entry)}, expected a string")
        try:
            keys.extend(read_public_keys(entry, base=section.file.parent))
        except ValueError as err:
            section.fail(
                where,
                str(err),
                hint='a public key line ("ssh-ed25519 AAAA...") or the path of a .pub file',
            )
    if not keys:
        section.fail(
            name,
            "is empty: nobody could log in over SSH",
            hint="add a public key, e.g. `--key ~/.ssh/id_ed25519.pub`",
        )
    return tuple(dict.fromkeys(keys))


def _banner(section: Section, name: str) -> str:
    text: str = section.take(name, str)
    # Shown by the client before the login: lines of text, and never a terminal's
    # control sequence (OpenSSH's client filters them; others may not).
    if len(text) > 4096 or any(not (c.isprintable() or c in "\n\t") for c in text):
        section.fail(name, "is not lines of printable text of at most 4096 characters")
    return text


@dataclass(frozen=True)
class SshConfig:
    listen: Listen = key(_listen, dump=Listen.yaml_value)
    # one public key line each, already read from files
    authorized_keys: tuple[str, ...] = key(_authorized_keys, dump=list)
    # sshd instances at once (sshd.socket's MaxConnections=, per source too): systemd's
    # default 64 cut a busy git or CI host's 65th session.
    max_connections: int = key(
        integer(1, 65535, hint="how many SSH connections at once, e.g. 256"), default=256
    )
    # Text a client shows before the login (sshd's Banner).
    banner: str | None = key(_banner, default=None)


def _socket_listen(section: Section, _name: str) -> Listen:
    protocol = section.take("protocol", str) or Protocol.TCP
    if protocol not in tuple(Protocol):
        section.fail("protocol", f"{protocol!r} is not tcp or udp")
    raw = section.take("listen", int, str, required=True)
    try:
        return Listen.parse(raw, protocol)
    except ValueError as err:
        section.fail("listen", f"{raw!r}: {err}", hint="a port or ADDRESS:PORT")


def _dump_socket_listen(listen: Listen) -> dict[str, Any]:
    protocol = {"protocol": listen.protocol} if listen.protocol != Protocol.TCP else {}
    return {"listen": listen.yaml_value(), **protocol}


def _native(section: Section, name: str) -> str:
    native: str = _unit_name(".socket", "native: echo.socket")(section, name)
    if native == "sshd.socket" or native.startswith("nspawnctl-"):
        section.fail(
            name,
            f"{native!r} is nspawnctl's own unit in the guest",
            hint="name a socket unit of the guest's own",
        )
    return native


@dataclass(frozen=True)
class SocketConfig:
    """A host socket for a guest service: proxied to a port (`to` + `service`), or taken
    over by a socket unit of the guest's own (`native`)."""

    listen: Listen = key(
        _socket_listen, keys={"listen": (), "protocol": ()}, dump=_dump_socket_listen
    )
    to: int | None = key(_port, default=None)
    service: str | None = key(_unit_name(".service", "service: nginx.service"), default=None)
    native: str | None = key(_native, default=None)

    def check(self, section: Section) -> None:
        if self.native is not None:
            if self.to is not None or self.service is not None:
                section.fail(
                    "native",
                    "goes without `to` and `service`",
                    hint="native: the guest's own socket unit takes the socket",
                )
            return
        if self.to is None or self.service is None:
            section.fail(
                "to" if self.to is None else "service",
                "is required",
                hint="give `to: PORT` and `service: UNIT`, or `native: UNIT.socket`",
            )
        if self.listen.protocol == Protocol.UDP:
            section.fail(
                "protocol",
                "udp cannot be proxied (systemd-socket-proxyd forwards TCP)",
                hint="use native: for a UDP service",
            )


@dataclass(frozen=True)
class NetworkConfig:
    mode: NetworkMode = NetworkMode.PRIVATE
    name: str | None = None  # the zone or bridge
    address: ipaddress.IPv4Interface | None = None  # static, for veth, zone and bridge

    @property
    def gateway(self) -> ipaddress.IPv4Interface | None:
        """The host side's address on the container's link: the first of its subnet."""
        if self.address is None or self.mode == NetworkMode.BRIDGE:
            return None
        first = next(self.address.network.hosts())
        return ipaddress.IPv4Interface(f"{first}/{self.address.network.prefixlen}")

    def __str__(self) -> str:
        return f"{self.mode}:{self.name}" if self.name else str(self.mode)


_NETWORK_KEYS = ("mode", "address")


def _network(top: Section, _name: str) -> NetworkConfig:
    raw = top.data.get("network", "private")
    if isinstance(raw, str):
        section = Section(top.file, "network", {"mode": raw}, _NETWORK_KEYS, top.name)
    else:
        section = top.below("network", _NETWORK_KEYS)
    value = section.take("mode", str) or "private"
    mode, _sep, link = value.partition(":")
    where = top.path("network") + (".mode" if isinstance(raw, dict) else "")
    if mode not in tuple(NetworkMode) or (mode in ("zone", "bridge")) != bool(link):
        raise ConfigError(
            top.file,
            where,
            f"{value!r} is not a network mode",
            hint="private, host, veth, zone:NAME or bridge:NAME",
        )
    if link and not _IFNAME_RE.match(link):
        raise ConfigError(
            top.file,
            where,
            f"{link!r} is not a {mode} name (at most 12 letters, digits, '-' or '_')",
        )
    address = _address(section, NetworkMode(mode), link)
    return NetworkConfig(NetworkMode(mode), link or None, address)


def _address(section: Section, mode: NetworkMode, link: str) -> ipaddress.IPv4Interface | None:
    text = section.take("address", str)
    if text is None:
        return None
    if mode not in (NetworkMode.VETH, NetworkMode.ZONE, NetworkMode.BRIDGE):
        section.fail(
            "address",
            f"a static address needs its own link, not mode {str(mode)!r}",
            hint="mode: veth, zone:NAME or bridge:NAME",
        )
    if mode == NetworkMode.VETH and len(f"ve-{section.name}") > 15:
        section.fail(
            "address",
            f"the host side of {section.name}'s veth would be longer than 15 characters",
            hint="use a container name of at most 12 characters, or a zone",
        )
    try:
        address = ipaddress.IPv4Interface(text)
    except ValueError:
        section.fail(
            "address", f"{text!r} is not an IPv4 address with a prefix", hint="e.g. 10.0.5.2/24"
        )
    network = address.network
    if (
        "/" not in text
        or network.prefixlen > 30
        or address.ip in (network.network_address, network.broadcast_address)
    ):
        section.fail(
            "address",
            f"{text!r} needs a /PREFIX of at most 30 and a host address",
            hint="e.g. 10.0.5.2/24",
        )
    gateway = NetworkConfig(mode, link or None, address).gateway
    if gateway is not None and gateway.ip == address.ip:
        section.fail(
            "address",
            f"{address.ip} is the host side's address of this link (the first of {network})",
            hint=f"e.g. {network[2]}/{network.prefixlen}",
        )
    return address


def _dump_network(network: NetworkConfig) -> dict[str, Any]:
    if network == NetworkConfig():
        return {}
    address = {"address": str(network.address)} if network.address else {}
    return {"network": {"mode": str(network), **address}}


def _image(top: Section, _name: str) -> Recipe:
    value = top.take("image", str)
    value = "debian:bookworm" if value is None else value
    try:
        recipe = parse_image(value)
    except ValueError as err:
        top.fail(
            "image", str(err), hint="e.g. debian:bookworm, ubuntu:noble, fedora:40, template:myapp"
        )
    section = top.below("bootstrap", _BOOTSTRAP_KEYS)
    packages = section.take("packages", list) or []
    for index, package in enumerate(packages):
        if not isinstance(package, str) or not PACKAGE_RE.match(package):
            section.fail(f"packages[{index}]", f"{package!r} is not a package name")
    source = section.take("source", str)
    if source is not None:
        source = str((top.file.parent / Path(source).expanduser()).absolute())
    try:
        return with_bootstrap(
            recipe,
            method=section.take("method", str),
            mirror=section.take("mirror", str),
            packages=tuple(packages),
            source=source,
        )
    except BootstrapError as err:
        section.fail(err.key, err.problem, hint="see BOOTSTRAP in nspawnctl.yaml(5)")


def _dump_image(recipe: Recipe) -> dict[str, Any]:
    bootstrap = {
        name: value
        for name, value in (
            ("mirror", recipe.mirror),
            ("packages", list(recipe.packages)),
            ("source", recipe.source),
        )
        if value
    }
    if recipe.source:
        bootstrap["method"] = recipe.method
    return {"image": recipe.image, **({"bootstrap": bootstrap} if bootstrap else {})}


def _hostname(top: Section, name: str) -> str:
    hostname: str | None = top.take(name, str)
    hostname = top.name if hostname is None else hostname
    try:
        check_hostname(hostname)
    except ValueError as err:
        top.fail(name, f"{hostname!r}: {err}")
    return hostname


def _keep_awake(top: Section, name: str) -> tuple[str, ...]:
    units = top.take(name, list)
    for index, unit in enumerate(units):
        if not isinstance(unit, str) or not _SERVICE_RE.match(unit):
            top.fail(
                f"{name}[{index}]",
                f"{unit!r} is not a service unit name",
                hint="e.g. keep_awake: [backup.service]",
            )
    return tuple(units)


def _resources(top: Section, name: str) -> Resources:
    section = top.below(name, tuple(RESOURCE_KEYS))
    resources = Resources()
    for key_name, raw in section.data.items():
        try:
            resources = resources.with_value(key_name, raw)
        except ValueError as err:
            section.fail(key_name, str(err), hint="see resources under KEYS in nspawnctl.yaml(5)")
    if resources.inodes is not None and resources.disk is None:
        section.fail(
            "inodes",
            "limits the files of the container's own disk, and there is none",
            hint="give resources.disk too",
        )
    return resources


def _dump_resources(resources: Resources) -> dict[str, Any]:
    return {"resources": resources.yaml_data()} if resources != Resources() else {}


_SECURITY_KEYS = tuple(f.name for f in dataclasses.fields(Security))


def _security(top: Section, name: str) -> Security:
    section = top.below(name, _SECURITY_KEYS)
    user_namespace = section.take("user_namespace", bool)
    names = section.take("drop_capabilities", list) or []
    dropped: list[str] = []
    for index, value in enumerate(names):
        try:
            dropped.append(capability_name(value))
        except ValueError as err:
            section.fail(f"drop_capabilities[{index}]", str(err), hint="e.g. [CAP_NET_RAW]")
    return Security(
        user_namespace=True if user_namespace is None else user_namespace,
        drop_capabilities=tuple(dict.fromkeys(dropped)),
    )


def _dump_security(security: Security) -> dict[str, Any]:
    if security == Security():
        return {}
    dropped = list(security.drop_capabilities)
    return {
        "security": {
            "user_namespace": security.user_namespace,
            **({"drop_capabilities": dropped} if dropped else {}),
        }
    }


@dataclass(frozen=True)
class ContainerConfig:
    name: str
    source: Path  # the YAML file it came from; named in every generated unit
    # What the container's image is built from.
    image: Recipe = key(_image, keys={"image": (), "bootstrap": _BOOTSTRAP_KEYS}, dump=_dump_image)
    hostname: str = key(_hostname, is_default=lambda value, config: value == config.name)
    ssh: SshConfig = mapping(SshConfig, required=True)
    sockets: tuple[SocketConfig, ...] = mappings(
        SocketConfig, example="e.g. {listen: 8080, to: 80, service: nginx.service}"
    )
    network: NetworkConfig = key(
        _network,
        factory=NetworkConfig,
        keys={"network": _NETWORK_KEYS},
        dump=_dump_network,
    )
    # seconds; None: never powered off for being idle
    idle_timeout: int | None = key(
        span(10, hint="an idle container is powered off after this long"),
        default=None,
        dump=_seconds,
    )
    # guest units that count as activity while active
    keep_awake: tuple[str, ...] = key(_keep_awake, default=(), dump=list)
    # seconds the guest gets to power off when the container is stopped; then it is killed
    stop_timeout: int = key(
        span(1, hint="a container still up this long after its stop is killed"),
        default=STOP_TIMEOUT,
        dump=_seconds,
    )
    resources: Resources = key(
        _resources,
        factory=Resources,
        keys={"resources": tuple(RESOURCE_KEYS)},
        dump=_dump_resources,
    )
    security: Security = key(
        _security, factory=Security, keys={"security": _SECURITY_KEYS}, dump=_dump_security
    )

    def listens(self) -> Iterator[tuple[str, Listen]]:
        """Every host address this container listens on, with the key that set it."""
        yield "ssh.listen", self.ssh.listen
        for index, socket in enumerate(self.sockets):
            yield f"sockets[{index}].listen", socket.listen

    def check(self, top: Section) -> None:
        """What holds between keys."""
        if self.keep_awake and self.idle_timeout is None:
            top.fail(
                "keep_awake",
                "only means something with idle_timeout",
                hint="add e.g. `idle_timeout: 10min`",
            )
        natives: set[str] = set()
        for index, socket in enumerate(self.sockets):
            if socket.native in natives:
                top.fail(
                    f"sockets[{index}].native",
                    f"{socket.native!r} takes another socket already",
                    hint="one host socket per native unit",
                )
            if socket.native:
                natives.add(socket.native)
        seen: list[tuple[str, Listen]] = []
        for name, listen in self.listens():
            for other_name, other in seen:
                if listen.overlaps(other):
                    top.fail(
                        name,
                        f"{listen} overlaps {other_name} ({other})",
                        hint="every socket of a container needs its own port",
                    )
            seen.append((name, listen))


# Every key, dotted as nspawnctl.yaml(5) names it: for the docs test and the fuzzer.
KNOWN_KEYS = tuple(known_keys(ContainerConfig))


def parse_config(name: str, data: Mapping[Any, Any], file: Path) -> ContainerConfig:
    """Validate one container's YAML data. `file` is named in errors and units."""
    try:
        check_machine_name(name)
    except ValueError as err:
        raise ConfigError(
            file, "name", f"{name!r}: {err}", hint="use letters, digits and '-', like 'web-1'"
        ) from None
    top = Section(file, "", data, keys_of(ContainerConfig), name)
    config: ContainerConfig = parse_mapping(ContainerConfig, top, name=name, source=file)
    return config


def load_config(name: str, file: Path) -> ContainerConfig:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            file, "", "no such file", hint=f"create it with `nspawnctl add {name}`"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(file, "", f"cannot read: {err}") from None
    return parse_config(name, load_yaml(text, file), file)


def kept_as(config: ContainerConfig, text: str, config_path: Path) -> tuple[ContainerConfig, str]:
    """A file given with -f is copied as it is, unless it names key files relative to
    its own directory: then its normalised form (keys inline) is kept instead."""
    moved = dataclasses.replace(config, source=config_path)
    try:
        same = parse_config(config.name, load_yaml(text, config_path), config_path) == moved
    except ConfigError:
        same = False
    return moved, text if same else dump_config(moved)


def dump_config(config: ContainerConfig) -> str:
    """The YAML that `add` writes for a container given on the command line."""
    return yaml.safe_dump(dump_mapping(config), sort_keys=False, width=1000)
