"""YAML -> typed, frozen model, validated once. Nothing past this module sees a raw dict."""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from nspawnctl.errors import ConfigError
from nspawnctl.listen import Listen
from nspawnctl.names import check_hostname, check_machine_name
from nspawnctl.recipe import Recipe, parse_image, with_bootstrap
from nspawnctl.resources import KEYS as RESOURCE_KEYS
from nspawnctl.resources import Resources
from nspawnctl.security import Security, capability_name

# Keys of DESIGN.md that a later version will understand. Until then they are
# errors like any unknown key, but with an honest message instead of "did you mean".
PLANNED_KEYS = frozenset({"binds"})

# The keys of each section; the whole schema at a glance.
_TOP_KEYS = (
    "image",
    "bootstrap",
    "hostname",
    "ssh",
    "sockets",
    "network",
    "idle_timeout",
    "keep_awake",
    "stop_timeout",
    "resources",
    "security",
)
_BOOTSTRAP_KEYS = ("method", "mirror", "packages", "source")
_SSH_KEYS = ("listen", "authorized_keys", "max_connections")
_SOCKET_KEYS = ("listen", "protocol", "to", "service", "native")
_NETWORK_KEYS = ("mode", "address")
_RESOURCES_KEYS = tuple(RESOURCE_KEYS)
_SECURITY_KEYS = tuple(f.name for f in fields(Security))
KNOWN_KEYS = (
    "image",
    *(f"bootstrap.{key}" for key in _BOOTSTRAP_KEYS),
    "hostname",
    *(f"ssh.{key}" for key in _SSH_KEYS),
    *(f"sockets[].{key}" for key in _SOCKET_KEYS),
    *(f"network.{key}" for key in _NETWORK_KEYS),
    "idle_timeout",
    "keep_awake",
    "stop_timeout",
    *(f"resources.{key}" for key in _RESOURCES_KEYS),
    *(f"security.{key}" for key in _SECURITY_KEYS),
)
# systemd's own default stop timeout is 90 s; the guest's quiesce comes before this.
STOP_TIMEOUT = 60
# systemd time spans as the YAML may give them: 90, "90s", "10min", "1h 30min".
_SPAN_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
_SPAN_RE = re.compile(r"(\d+)\s*(min|sec|hr|s|m|h|d|)\s*")
# keep_awake names go to a guest script on a unit's command line, where systemd would
# unescape a backslash: plain service names only. A socket is always active.
_SERVICE_RE = re.compile(r"^[A-Za-z0-9:_.@-]+\.service\Z")
NETWORK_MODES = ("private", "host", "veth", "zone", "bridge")
# A unit name as systemd takes it: one '@' at most and never a bare template (a@.service);
# at most 253 characters, so that its drop-in directory NAME.d is a valid file name.
# `\Z`, not `$`: `$` also matches before a trailing newline.
_UNIT_RE = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]+)?\.(service|socket)\Z"
)
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,12}\Z")

KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_KEY_RE = re.compile(
    r"(?:^|\s)(?:" + "|".join(map(re.escape, KEY_TYPES)) + r")\s+[A-Za-z0-9+/]{16,}={0,3}(?:\s|$)"
)
_PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._-]*\Z")
# A key line goes into the guest's authorized_keys as it is: one line, no escapes.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class SshConfig:
    listen: Listen
    authorized_keys: tuple[str, ...]  # one public key line each, already read from files
    # sshd instances at once (sshd.socket's MaxConnections=, per source too): systemd's
    # default 64 cut a busy git or CI host's 65th session.
    max_connections: int = 256


@dataclass(frozen=True)
class SocketConfig:
    """A host socket for a guest service: proxied to a port (`to` + `service`), or taken
    over by a socket unit of the guest's own (`native`)."""

    listen: Listen
    to: int | None = None
    service: str | None = None
    native: str | None = None


@dataclass(frozen=True)
class NetworkConfig:
    mode: str = "private"  # one of NETWORK_MODES
    name: str | None = None  # the zone or bridge
    address: ipaddress.IPv4Interface | None = None  # static, for veth, zone and bridge

    @property
    def gateway(self) -> ipaddress.IPv4Interface | None:
        """The host side's address on the container's link: the first of its subnet."""
        if self.address is None or self.mode == "bridge":
            return None
        first = next(self.address.network.hosts())
        return ipaddress.IPv4Interface(f"{first}/{self.address.network.prefixlen}")

    def __str__(self) -> str:
        return f"{self.mode}:{self.name}" if self.name else self.mode


@dataclass(frozen=True)
class ContainerConfig:
    name: str
    source: Path  # the YAML file it came from; named in every generated unit
    image: Recipe  # what the container's image is built from
    hostname: str
    ssh: SshConfig
    sockets: tuple[SocketConfig, ...] = ()
    network: NetworkConfig = NetworkConfig()
    idle_timeout: int | None = None  # seconds; None: never powered off for being idle
    keep_awake: tuple[str, ...] = ()  # guest units that count as activity while active
    # seconds the guest gets to power off when the container is stopped; then it is killed
    stop_timeout: int = STOP_TIMEOUT
    resources: Resources = field(default_factory=Resources)
    security: Security = field(default_factory=Security)

    def listens(self) -> Iterator[tuple[str, Listen]]:
        """Every host address this container listens on, with the key that set it."""
        yield "ssh.listen", self.ssh.listen
        for index, socket in enumerate(self.sockets):
            yield f"sockets[{index}].listen", socket.listen


# libyaml's parser, where PyYAML was built with it: 9 times faster than the pure-Python
# one, which made `list` of a thousand containers take most of a second.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """A safe loader that refuses duplicate keys and aliases.

    A duplicate key silently overriding an earlier one hides mistakes; aliases are
    never needed in a container file and are how YAML bombs are built.
    """

    def get_single_node(self) -> yaml.Node | None:
        node: yaml.Node | None = super().get_single_node()
        if node is not None:
            _refuse_aliases(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):
                raise yaml.constructor.ConstructorError(
                    None, None, "keys must be plain words", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _refuse_aliases(root: yaml.Node) -> None:
    """An alias is the node of its anchor used again: a node met twice (before anything
    is constructed, so a YAML bomb never unfolds)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed", node.start_mark
            )
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_yaml(text: str, file: Path) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        # A reader error has no `problem`, and its text names "<unicode string>" on a
        # second line: one line of it is enough.
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(file, "", f"not valid YAML: {where}{problem}") from None
    except RecursionError:
        raise ConfigError(file, "", "not valid YAML: nested too deeply") from None
    except ValueError as err:
        # From PyYAML's constructors: an integer past Python's 4300 digits, a date
        # like 2024-13-45. The rest of the message is about Python, not the file.
        raise ConfigError(file, "", f"not valid YAML: {str(err).split(':')[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            file,
            "",
            f"the document is a {_type_name(data)}, expected a mapping of keys",
            hint="start from `nspawnctl add NAME --ssh PORT --key KEY`, or see nspawnctl.yaml(5)",
        )
    return data


def _type_name(value: object) -> str:
    return {
        dict: "mapping",
        list: "list",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


class _Section:
    """One mapping of the file, with the keys it may hold. Unknown keys are reported
    first, so a misspelt key gets "did you mean", not "the right key is missing"."""

    def __init__(
        self, file: Path, prefix: str, data: Mapping[Any, Any], known: Sequence[str]
    ) -> None:
        self.file = file
        self.prefix = prefix
        self.data = dict(data)
        for key in self.data:
            self._check_known(str(key), known)

    def _check_known(self, name: str, known: Sequence[str]) -> None:
        if name in known:
            return
        if not self.prefix and name in PLANNED_KEYS:
            self.fail(
                name,
                "is not supported by this version of nspawnctl yet",
                hint="see nspawnctl.yaml(5) for the keys it understands",
            )
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        self.fail(
            name,
            "unknown key",
            hint=f"did you mean '{self.path(close[0])}'?"
            if close
            else "known keys here: " + ", ".join(known),
        )

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, problem: str, hint: str | None = None) -> NoReturn:
        raise ConfigError(self.file, self.path(key), problem, hint=hint)

    def take(self, key: str, *types: type, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                self.fail(key, "is required", hint=f"add `{self.path(key)}:` to the file")
            return None
        value = self.data[key]
        # bool is an int in Python; a port of `true` is a mistake, not 1.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join(_type_name(t()) for t in types)
            self.fail(key, f"{value!r} is a {_type_name(value)}, expected a {expected}")
        return value

    def section(self, key: str, known: Sequence[str], *, required: bool = False) -> _Section:
        value = self.take(key, dict, required=required)
        return _Section(self.file, self.path(key), value or {}, known)


def parse_config(name: str, data: Mapping[Any, Any], file: Path) -> ContainerConfig:
    """Validate one container's YAML data. `file` is named in errors and units."""
    try:
        check_machine_name(name)
    except ValueError as err:
        raise ConfigError(
            file, "name", f"{name!r}: {err}", hint="use letters, digits and '-', like 'web-1'"
        ) from None
    top = _Section(file, "", data, _TOP_KEYS)
    image = _parse_image(top)
    hostname = top.take("hostname", str)
    hostname = name if hostname is None else hostname
    try:
        check_hostname(hostname)
    except ValueError as err:
        top.fail("hostname", f"{hostname!r}: {err}")
    ssh = _parse_ssh(top.section("ssh", _SSH_KEYS, required=True))
    sockets = _parse_sockets(top)
    network = _parse_network(top, name)
    idle_timeout = _parse_span(
        top, "idle_timeout", 10, hint="an idle container is powered off after this long"
    )
    stop_timeout = _parse_span(
        top, "stop_timeout", 1, hint="a container still up this long after its stop is killed"
    )
    keep_awake = top.take("keep_awake", list) or []
    for index, unit in enumerate(keep_awake):
        if not isinstance(unit, str) or not _SERVICE_RE.match(unit):
            top.fail(
                f"keep_awake[{index}]",
                f"{unit!r} is not a service unit name",
                hint="e.g. keep_awake: [backup.service]",
            )
    if keep_awake and idle_timeout is None:
        top.fail(
            "keep_awake",
            "only means something with idle_timeout",
            hint="add e.g. `idle_timeout: 10min`",
        )
    config = ContainerConfig(
        name=name,
        source=file,
        image=image,
        hostname=hostname,
        ssh=ssh,
        sockets=sockets,
        network=network,
        idle_timeout=idle_timeout,
        keep_awake=tuple(keep_awake),
        stop_timeout=STOP_TIMEOUT if stop_timeout is None else stop_timeout,
        resources=_parse_resources(top.section("resources", _RESOURCES_KEYS)),
        security=_parse_security(top.section("security", _SECURITY_KEYS)),
    )
    _check_own_listens(config)
    return config


def _parse_resources(section: _Section) -> Resources:
    resources = Resources()
    for key, raw in section.data.items():
        try:
            resources = resources.with_value(key, raw)
        except ValueError as err:
            section.fail(key, str(err), hint="see resources under KEYS in nspawnctl.yaml(5)")
    return resources


def _parse_security(section: _Section) -> Security:
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


def _parse_span(top: _Section, key: str, least: int, *, hint: str) -> int | None:
    """A time span of `least` seconds to 7 days, or None if the key is not there."""
    value = top.take(key, int, str)
    if value is None:
        return None
    text = str(value).strip()
    seconds, end = 0, 0
    for match in _SPAN_RE.finditer(text):
        if match.start() != end:
            break
        # Ten digits are past 7 days in any unit; and int() refuses more than 4300.
        if len(match.group(1).lstrip("0")) >= 10:
            top.fail(key, f"{value!r} is longer than 7 days", hint="e.g. 90, 30s, 10min, 1h 30min")
        seconds += int(match.group(1)) * _SPAN_UNITS[match.group(2)]
        end = match.end()
    if not text or end != len(text):
        top.fail(key, f"{value!r} is not a time span", hint="e.g. 90, 30s, 10min, 1h 30min")
    if not least <= seconds <= 7 * 86400:
        top.fail(key, f"{value!r} is {seconds} s: expected {least} s to 7 days", hint=hint)
    return seconds


def _parse_sockets(top: _Section) -> tuple[SocketConfig, ...]:
    items = top.take("sockets", list) or []
    sockets: list[SocketConfig] = []
    for index, item in enumerate(items):
        key = f"sockets[{index}]"
        if not isinstance(item, dict):
            top.fail(
                key,
                f"{item!r} is a {_type_name(item)}, expected a mapping",
                hint="e.g. {listen: 8080, to: 80, service: nginx.service}",
            )
        section = _Section(top.file, key, item, _SOCKET_KEYS)
        protocol = section.take("protocol", str) or "tcp"
        if protocol not in ("tcp", "udp"):
            section.fail("protocol", f"{protocol!r} is not tcp or udp")
        raw = section.take("listen", int, str, required=True)
        try:
            listen = Listen.parse(raw, protocol)
        except ValueError as err:
            section.fail("listen", f"{raw!r}: {err}", hint="a port or ADDRESS:PORT")
        to, service = section.take("to", int), section.take("service", str)
        native = section.take("native", str)
        if native is not None:
            if to is not None or service is not None:
                section.fail(
                    "native",
                    "goes without `to` and `service`",
                    hint="native: the guest's own socket unit takes the socket",
                )
            if not _UNIT_RE.match(native) or not native.endswith(".socket"):
                section.fail(
                    "native",
                    f"{native!r} is not a socket unit name",
                    hint="e.g. native: echo.socket",
                )
            if native == "sshd.socket" or native.startswith("nspawnctl-"):
                section.fail(
                    "native",
                    f"{native!r} is nspawnctl's own unit in the guest",
                    hint="name a socket unit of the guest's own",
                )
            if native in {s.native for s in sockets}:
                section.fail(
                    "native",
                    f"{native!r} takes another socket already",
                    hint="one host socket per native unit",
                )
        else:
            if to is None or service is None:
                section.fail(
                    "to" if to is None else "service",
                    "is required",
                    hint="give `to: PORT` and `service: UNIT`, or `native: UNIT.socket`",
                )
            assert to is not None and service is not None
            if not 1 <= to <= 65535:
                section.fail("to", f"{to!r} is not a port (expected 1-65535)")
            if not _UNIT_RE.match(service) or not service.endswith(".service"):
                section.fail(
                    "service",
                    f"{service!r} is not a service unit name",
                    hint="e.g. service: nginx.service",
                )
            if protocol == "udp":
                section.fail(
                    "protocol",
                    "udp cannot be proxied (systemd-socket-proxyd forwards TCP)",
                    hint="use native: for a UDP service",
                )
        sockets.append(SocketConfig(listen, to, service, native))
    return tuple(sockets)


def _parse_network(top: _Section, name: str) -> NetworkConfig:
    raw = top.data.get("network", "private")
    if isinstance(raw, str):
        section = _Section(top.file, "network", {"mode": raw}, _NETWORK_KEYS)
    else:
        section = top.section("network", _NETWORK_KEYS)
    value = section.take("mode", str) or "private"
    mode, _sep, link = value.partition(":")
    key = "mode" if isinstance(raw, dict) else ""
    where = top.path("network") + (f".{key}" if key else "")
    if mode not in NETWORK_MODES or (mode in ("zone", "bridge")) != bool(link):
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
    address_text = section.take("address", str)
    address = None
    if address_text is not None:
        if mode not in ("veth", "zone", "bridge"):
            section.fail(
                "address",
                f"a static address needs its own link, not mode {mode!r}",
                hint="mode: veth, zone:NAME or bridge:NAME",
            )
        if mode == "veth" and len(f"ve-{name}") > 15:
            section.fail(
                "address",
                f"the host side of {name}'s veth would be longer than 15 characters",
                hint="use a container name of at most 12 characters, or a zone",
            )
        try:
            address = ipaddress.IPv4Interface(address_text)
        except ValueError:
            section.fail(
                "address",
                f"{address_text!r} is not an IPv4 address with a prefix",
                hint="e.g. 10.0.5.2/24",
            )
        network = address.network
        if (
            "/" not in address_text
            or network.prefixlen > 30
            or address.ip in (network.network_address, network.broadcast_address)
        ):
            section.fail(
                "address",
                f"{address_text!r} needs a /PREFIX of at most 30 and a host address",
                hint="e.g. 10.0.5.2/24",
            )
        gateway = NetworkConfig(mode, link or None, address).gateway
        if gateway is not None and gateway.ip == address.ip:
            section.fail(
                "address",
                f"{address.ip} is the host side's address of this link (the first of {network})",
                hint=f"e.g. {network[2]}/{network.prefixlen}",
            )
    return NetworkConfig(mode, link or None, address)


def _check_own_listens(config: ContainerConfig) -> None:
    seen: list[tuple[str, Listen]] = []
    for key, listen in config.listens():
        for other_key, other in seen:
            if listen.overlaps(other):
                raise ConfigError(
                    config.source,
                    key,
                    f"{listen} overlaps {other_key} ({other})",
                    hint="every socket of a container needs its own port",
                )
        seen.append((key, listen))


def _parse_image(top: _Section) -> Recipe:
    value = top.take("image", str)
    value = "debian:bookworm" if value is None else value
    try:
        recipe = parse_image(value)
    except ValueError as err:
        top.fail(
            "image", str(err), hint="e.g. debian:bookworm, ubuntu:noble, fedora:40, template:myapp"
        )
    section = top.section("bootstrap", _BOOTSTRAP_KEYS)
    packages = section.take("packages", list) or []
    for index, package in enumerate(packages):
        if not isinstance(package, str) or not _PACKAGE_RE.match(package):
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
    except ValueError as err:
        key, _sep, problem = str(err).partition(": ")
        section.fail(key, problem, hint="see BOOTSTRAP in nspawnctl.yaml(5)")


def _parse_ssh(section: _Section) -> SshConfig:
    raw_listen = section.take("listen", int, str, required=True)
    try:
        listen = Listen.parse(raw_listen)
    except ValueError as err:
        section.fail(
            "listen",
            f"{raw_listen!r}: {err}",
            hint="a port (2222) or ADDRESS:PORT (127.0.0.1:2222, [::1]:2222)",
        )
    raw_keys = section.take("authorized_keys", list, required=True)
    keys: list[str] = []
    for index, entry in enumerate(raw_keys):
        key = f"authorized_keys[{index}]"
        if not isinstance(entry, str):
            section.fail(key, f"{entry!r} is a {_type_name(entry)}, expected a string")
        try:
            keys.extend(read_public_keys(entry, base=section.file.parent))
        except ValueError as err:
            section.fail(
                key,
                str(err),
                hint='a public key line ("ssh-ed25519 AAAA...") or the path of a .pub file',
            )
    if not keys:
        section.fail(
            "authorized_keys",
            "is empty: nobody could log in over SSH",
            hint="add a public key, e.g. `--key ~/.ssh/id_ed25519.pub`",
        )
    max_connections = section.take("max_connections", int)
    if max_connections is None:
        max_connections = SshConfig.max_connections
    elif not 1 <= max_connections <= 65535:
        section.fail(
            "max_connections",
            f"{max_connections!r}: is not between 1 and 65535",
            hint="how many SSH connections at once, e.g. 256",
        )
    return SshConfig(listen, tuple(dict.fromkeys(keys)), max_connections)


def read_public_keys(entry: str, *, base: Path) -> list[str]:
    """A key line as it is, or the key lines of a file; ValueError if there is no key."""
    entry = entry.strip()
    if _KEY_RE.search(entry):
        if _CONTROL_RE.search(entry):
            raise ValueError("a key must be a single line of printable text")
        return [entry]
    try:
        path = (base / Path(entry).expanduser()) if entry else base
        # A device or a FIFO (/dev/zero, /dev/stdin) could be read forever.
        if path.exists() and not path.is_file():
            raise ValueError(f"{entry!r} is neither a public key nor a regular file")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, RuntimeError) as err:
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
        elif isinstance(err, RuntimeError):  # from expanduser(): ~nosuchuser/key.pub
            reason = "no such user"
        else:
            reason = "not a text file"
        raise ValueError(
            f"{entry!r} is neither a public key nor a readable file ({reason})"
        ) from None
    numbered = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    numbered = [(n, ln) for n, ln in numbered if ln and not ln.startswith("#")]
    lines = [ln for _n, ln in numbered]
    bad = [n for n, ln in numbered if not _KEY_RE.search(ln) or _CONTROL_RE.search(ln)]
    if bad or not lines:
        raise ValueError(
            f"{str(path)!r} holds no public key (is it the private key?)"
            if not lines or "PRIVATE KEY" in text
            # Which line, never what it says: the file may be a secret (/etc/shadow).
            else f"{str(path)!r}: line {bad[0]} is not a public key"
        )
    return lines


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


def check_conflicts(config: ContainerConfig, others: Sequence[ContainerConfig]) -> None:
    """Refuse a listen address or a static address that another container already uses."""
    for other in others:
        if (
            other.name != config.name
            and config.network.address
            and (config.network.address.ip == (other.network.address and other.network.address.ip))
        ):
            raise ConfigError(
                config.source,
                "network.address",
                f"{config.network.address.ip} is already the address of container "
                f"'{other.name}' ({other.source})",
                hint="choose another address",
            )
    for key, listen in config.listens():
        for other in others:
            if other.name == config.name:
                continue
            for other_key, other_listen in other.listens():
                if listen.overlaps(other_listen):
                    raise ConfigError(
                        config.source,
                        key,
                        f"port {listen.port} is already used by container '{other.name}' "
                        f"({other.source}: {other_key}: {other_listen})",
                        hint="choose another port, or a different address for each",
                    )


def dump_config(config: ContainerConfig) -> str:
    """The YAML that `add` writes for a container given on the command line."""
    data: dict[str, Any] = {"image": config.image.image}
    bootstrap = {
        key: value
        for key, value in (
            ("mirror", config.image.mirror),
            ("packages", list(config.image.packages)),
            ("source", config.image.source),
        )
        if value
    }
    if config.image.source:
        bootstrap["method"] = config.image.method
    if bootstrap:
        data["bootstrap"] = bootstrap
    if config.hostname != config.name:
        data["hostname"] = config.hostname
    data["ssh"] = {
        "listen": config.ssh.listen.yaml_value(),
        "authorized_keys": list(config.ssh.authorized_keys),
        **(
            {"max_connections": config.ssh.max_connections}
            if config.ssh.max_connections != SshConfig.max_connections
            else {}
        ),
    }
    if config.sockets:
        data["sockets"] = [
            {
                "listen": s.listen.yaml_value(),
                **({"protocol": s.listen.protocol} if s.listen.protocol != "tcp" else {}),
                **({"native": s.native} if s.native else {"to": s.to, "service": s.service}),
            }
            for s in config.sockets
        ]
    if config.idle_timeout is not None:
        data["idle_timeout"] = f"{config.idle_timeout}s"
    if config.keep_awake:
        data["keep_awake"] = list(config.keep_awake)
    if config.stop_timeout != STOP_TIMEOUT:
        data["stop_timeout"] = f"{config.stop_timeout}s"
    if config.resources != Resources():
        data["resources"] = config.resources.yaml_data()
    if config.security != Security():
        data["security"] = {
            "user_namespace": config.security.user_namespace,
            **(
                {"drop_capabilities": list(config.security.drop_capabilities)}
                if config.security.drop_capabilities
                else {}
            ),
        }
    if config.network != NetworkConfig():
        network: dict[str, Any] = {"mode": str(config.network)}
        if config.network.address:
            network["address"] = str(config.network.address)
        data["network"] = network
    return yaml.safe_dump(data, sort_keys=False, width=1000)
