"""Bad input, fuzzed. Every YAML document, container name and `render` command line
is either accepted, and then renders units that systemd-analyze accepts, or refused
with an NspawnctlError that says what is wrong: never a traceback, never a file
outside nspawnctl's (here: private) directories.

Deterministic and bounded by default, for CI. For a longer, random run:
    NSPAWNCTL_FUZZ_EXAMPLES=5000 python3 -m pytest tests/unit/test_fuzz.py -s
(-s prints how many documents were accepted, refused and verified.)
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import io
import os
import re
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nspawnctl import cli, config, container, pubkeys, yamlfile
from nspawnctl.errors import ConfigError
from nspawnctl.install import systemd_verify, verify_units
from nspawnctl.layers import Layer
from nspawnctl.log import log
from nspawnctl.names import check_machine_name, machine_name, service_unit, socket_unit
from nspawnctl.paths import Paths, environment_variables
from nspawnctl.render import GENERATED_MARK, RenderedFile, Rendering

# NSPAWNCTL_FUZZ_EXAMPLES=N: N examples per test, drawn at random. Unset: a fixed,
# small run (derandomized), so that CI is quick and fails the same way every time.
_EXAMPLES = int(os.environ.get("NSPAWNCTL_FUZZ_EXAMPLES") or 0)
# systemd-analyze costs about 0.1 s a call: verify one accepted rendering in this many.
_VERIFY_EVERY = int(os.environ.get("NSPAWNCTL_FUZZ_VERIFY_EVERY") or 3)


def _fuzz(default: int) -> settings:
    return settings(
        max_examples=_EXAMPLES or default,
        derandomize=not _EXAMPLES,
        deadline=None,
        database=None,  # nothing written into the work tree
        suppress_health_check=list(HealthCheck),
    )


STATS: collections.Counter[str] = collections.Counter()

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFuzzFuzzFuzzFuzzFuzzFuzzFuzzFuzzFuzzFuzzFuzz fuzz"


# ---------------------------------------------------------------- the private root


class Root(NamedTuple):
    path: Path
    paths: Paths
    docs: Path  # where -f files go; not one of nspawnctl's directories


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    """Every NSPAWNCTL_*_DIR in one temporary directory, for the whole module; the
    working directory too, so that relative paths in documents land there."""
    top = tmp_path_factory.mktemp("fuzz-root")
    with pytest.MonkeyPatch.context() as mp:
        for var in environment_variables():
            mp.setenv(var, str(top / var.lower()))
        (top / "cwd").mkdir()
        mp.chdir(top / "cwd")
        (top / "docs").mkdir()
        (top / "docs" / "id.pub").write_text(KEY + "\n")
        paths = Paths.from_env()
        # for documents naming a key file relative to their own directory
        paths.config_dir.mkdir()
        (paths.config_dir / "id.pub").write_text(KEY + "\n")
        yield Root(top, paths, top / "docs")
    if STATS:
        print("\nfuzz:", ", ".join(f"{k} {v}" for k, v in sorted(STATS.items())))


def _listing(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return sorted(
        (str(p), p.stat().st_mtime_ns if not p.is_symlink() else 0) for p in path.rglob("*")
    )


@pytest.fixture(scope="module", autouse=True)
def _real_host_untouched() -> Iterator[None]:
    """The machine's own configuration directories, before and after every test here."""
    watched = [
        Path(default)
        for var, default in environment_variables().items()
        if var in ("NSPAWNCTL_CONFIG_DIR", "NSPAWNCTL_UNIT_DIR", "NSPAWNCTL_NSPAWN_DIR")
    ]
    before = {p: _listing(p) for p in watched}
    yield
    assert {p: _listing(p) for p in watched} == before


# ---------------------------------------------------------------- strategies

# The schema as a tree, from config.KNOWN_KEYS: {"ssh": {"listen": None, ...},
# "sockets": [{"listen": None, ...}], "image": None}. A key added there is fuzzed here.
Schema = dict[str, Any]


def _schema() -> Schema:
    tree: Schema = {}
    for dotted in config.KNOWN_KEYS:
        node = tree
        *sections, leaf = dotted.split(".")
        for part in sections:
            if part.endswith("[]"):
                node = node.setdefault(part[:-2], [{}])[0]
            else:
                node = node.setdefault(part, {})
        node[leaf] = None
    return tree


SCHEMA = _schema()

# (st.from_regex is slow: these are built from plain text strategies)
_LOWER = string.ascii_lowercase + string.digits
_ALNUM = string.ascii_letters + string.digits


def _word(first: str, middle: str, size: int, last: str | None = None) -> st.SearchStrategy[str]:
    head = st.sampled_from(first)
    if last is None:
        return st.tuples(head, st.text(middle, max_size=size)).map("".join)
    whole = st.tuples(head, st.text(middle, max_size=size), st.sampled_from(last)).map("".join)
    return st.one_of(head, whole)


names = _word(_LOWER, _LOWER + "-", 10, _LOWER)
labels = _word(_ALNUM, _ALNUM + "-", 20, _ALNUM)
unit_stems = _word(_ALNUM, _ALNUM + ":_.-", 30)
ports = st.integers(1, 65535)
key_lines = st.builds(
    lambda kind, body, comment: f"{kind} {body} {comment}".strip(),
    st.sampled_from(pubkeys.KEY_TYPES),
    st.binary(min_size=16, max_size=60).map(lambda b: base64.b64encode(b).decode()),
    st.text(string.ascii_letters + string.digits + "@.-_ ", max_size=20),
)
spans = st.one_of(
    st.integers(10, 7 * 86400),
    st.integers(10, 3600).map(lambda s: f"{s}s"),
    st.integers(1, 600).map(lambda m: f"{m}min"),
    st.builds(lambda h, m: f"{h}h {m}min", st.integers(1, 100), st.integers(0, 59)),
)

# Values the loader must accept for keys that stand on their own. A key of
# KNOWN_KEYS without an entry is left out of valid documents (and fuzzed all the same
# with hostile values): add one here when adding a key.
VALID: dict[str, st.SearchStrategy[Any]] = {
    "hostname": st.lists(labels, min_size=1, max_size=3)
    .map(".".join)
    .filter(lambda h: len(h) <= 64),
    "idle_timeout": spans,
    "stop_timeout": spans,
    "bootstrap.mirror": st.sampled_from(
        ["http://deb.debian.org/debian", "https://mirror.example.org/debian/"]
    ),
    "bootstrap.packages": st.lists(_word(_LOWER, _LOWER + "+.-", 20), max_size=4),
    "resources.memory": st.one_of(
        st.sampled_from(["512M", "2G", "64M", "1T"]), st.integers(1 << 24, 1 << 40)
    ),
    "resources.cpu": st.integers(1, 400).map(lambda p: f"{p}%"),
    "resources.tasks": st.integers(16, 100_000),
    "resources.io_weight": st.integers(1, 10_000),
    "security.user_namespace": st.booleans(),
    "security.drop_capabilities": st.lists(
        st.sampled_from(["CAP_NET_RAW", "net_admin", "SYS_ADMIN", "CAP_MKNOD"]),
        max_size=3,
        unique=True,
    ),
}


def listens(port: int) -> st.SearchStrategy[int | str]:
    return st.one_of(
        st.just(port),
        st.just(str(port)),
        st.ip_addresses(v=4).map(lambda a: f"{a}:{port}"),
        st.ip_addresses(v=6).map(lambda a: f"[{a}]:{port}"),
    )


@st.composite
def networks(draw: st.DrawFn, name: str) -> str | dict[str, str]:
    mode = draw(st.sampled_from(["private", "host", "veth", "zone", "bridge"]))
    if mode in ("zone", "bridge"):
        mode += ":" + draw(st.text(_ALNUM + "_-", min_size=1, max_size=12))
    if mode in ("private", "host") or (mode == "veth" and len(name) > 12) or draw(st.booleans()):
        return mode if draw(st.booleans()) else {"mode": mode}
    prefix = draw(st.integers(8, 30))
    net = draw(st.integers(0, 2**32 - 1)) >> (32 - prefix) << (32 - prefix)
    # the first host address is the host side's (veth, zone); the last is broadcast
    host = draw(st.integers(2, 2 ** (32 - prefix) - 2))
    address = ".".join(str((net + host) >> s & 255) for s in (24, 16, 8, 0))
    return {"mode": mode, "address": f"{address}/{prefix}"}


@st.composite
def valid_documents(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A container name and a document the loader must accept."""
    name = draw(names)
    doc: dict[str, Any] = {}
    image = draw(
        st.sampled_from(["debian:bookworm", "ubuntu:noble", "fedora:40", "template:base", None])
    )
    if image:
        doc["image"] = image
    for dotted, values in VALID.items():
        if dotted not in config.KNOWN_KEYS or not draw(st.booleans()):
            continue
        section, _dot, key = dotted.rpartition(".")
        if section == "bootstrap" and (image or "").startswith("template:"):
            continue  # a template is imported, not bootstrapped from a mirror
        target = doc.setdefault(section, {}) if section else doc
        target[key] = draw(values)
    if image == "template:base" and draw(st.booleans()):
        method = draw(st.sampled_from(["tar", "directory"]))
        doc["bootstrap"] = {"method": method, "source": "../../srv/base"}
    taken = draw(st.lists(ports, min_size=1, max_size=4, unique=True))
    doc["ssh"] = {
        "listen": draw(listens(taken[0])),
        "authorized_keys": draw(
            st.lists(st.one_of(key_lines, st.just("id.pub")), min_size=1, max_size=3)
        ),
    }
    sockets = []
    for index, port in enumerate(taken[1:]):
        if draw(st.booleans()):
            item = {"listen": draw(listens(port)), "to": draw(ports)}
            instance = draw(st.one_of(st.just(""), unit_stems.map(lambda s: "@" + s)))
            item["service"] = draw(unit_stems) + instance + ".service"
        else:
            item = {"listen": draw(listens(port)), "native": f"n{index}-{draw(unit_stems)}.socket"}
            if draw(st.booleans()):
                item["protocol"] = draw(st.sampled_from(["tcp", "udp"]))
        sockets.append(item)
    if sockets:
        doc["sockets"] = sockets
    if "idle_timeout" not in doc:
        doc.pop("keep_awake", None)
    elif draw(st.booleans()):
        doc["keep_awake"] = draw(st.lists(unit_stems.map(lambda s: s + ".service"), max_size=3))
    if draw(st.booleans()):
        doc["network"] = draw(networks(name))
    return name, doc


TRAVERSALS = [
    "../../etc",
    "../../etc/passwd",
    "/etc/passwd",
    "/etc/ssh/ssh_host_ed25519_key",
    "..",
    ".",
    "/",
    "",
    "~root/.ssh/authorized_keys",
    "~nosuchuser/.ssh/id_ed25519.pub",
    "/dev/zero",
    "/dev/urandom",
    "/proc/self/environ",
    "a/../../../b",
]
LISTEN_GARBAGE = [
    0,
    65536,
    -22,
    "0",
    "65536",
    "[::1]:22",
    "[::1]",
    "::1:22",
    "1.2.3.4:",
    ":22",
    "host:port",
    "localhost:22",
    "1.2.3.4:22/udp",
    " 22 ",
    "22\n",
    "[fe80::1%eth0]:22",
    "[fe80::1%n]:22",
    "\u0662\u0662",  # Arabic-Indic digits
    "\u00b2\u00b2",  # superscripts: isdigit() but not int()
    "0x16",
    "1_000",
    "1" * 5000,
    "1.2.3.4:" + "9" * 5000,
]
UNIT_GARBAGE = [
    "a@.service",
    "@.service",
    ".service",
    "x" * 300 + ".service",
    "x" * 300 + ".socket",
    "../x.service",
    "a b.service",
    "%n.service",
    "a\\x2d.service",
    "sshd.socket",
    "nspawnctl-x.socket",
    "a.service\n",
    "a.socket\n",
    "a@b@c.socket",
    "CAP_NET_RAW",
    "ALL",
]
hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 65535, 65536, 2**31, 2**63, 2**64, 10**100, 10**4000]),
    st.floats(),
    st.text(max_size=40),
    st.text(st.characters(max_codepoint=0x9F), max_size=20),  # control characters
    st.sampled_from(TRAVERSALS + LISTEN_GARBAGE + UNIT_GARBAGE),
    st.sampled_from(["a" * 10_000, "9" * 5000 + "s", "é" * 300, "\x00", "\r\n", "\u2028"]),
    st.dates(),
    st.binary(max_size=16),
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


def _mappings(doc: Any, schema: Any) -> Iterator[tuple[dict[Any, Any], Schema | None]]:
    """Every mapping in `doc`, with the schema it should follow (None: not the schema's)."""
    if isinstance(doc, dict):
        yield doc, schema if isinstance(schema, dict) else None
        for key, value in doc.items():
            sub = schema.get(key) if isinstance(schema, dict) else None
            yield from _mappings(value, sub)
    elif isinstance(doc, list):
        for item in doc:
            yield from _mappings(item, schema[0] if isinstance(schema, list) else None)


def _unknown_keys(known: Schema) -> st.SearchStrategy[Any]:
    near = [k[:-1] for k in known if len(k) > 1] + [k.upper() for k in known]
    other_levels = [k for dotted in config.KNOWN_KEYS for k in re.split(r"[.\[\]]+", dotted) if k]
    return st.one_of(
        st.sampled_from([*near, *other_levels, *sorted(config.PLANNED_KEYS), "../../etc"]),
        st.text(min_size=1, max_size=30),
        st.integers(),
        st.booleans(),
        st.none(),
    ).filter(lambda k: str(k) not in known)


class Mutated(NamedTuple):
    name: str
    doc: dict[str, Any]

    @property
    def must_refuse(self) -> bool:
        """Whether a mapping of the schema holds a key the schema does not know."""
        return any(
            str(key) not in schema
            for mapping, schema in _mappings(self.doc, SCHEMA)
            if schema is not None
            for key in mapping
        )


def _leaves(doc: Any) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every string and number in `doc`."""
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    )
    for key, value in list(items):
        if isinstance(value, str | int) and not isinstance(value, bool):
            yield doc, key
        yield from _leaves(value)


# Put into a value that was right: what a regular expression ending in `$` lets
# through, what a unit file or a file name cannot hold.
TWEAKS = [
    "\n",
    "\r",
    "\t",
    " ",
    "\x00",
    "\x1b",
    "%",
    "%n",
    "@",
    "/",
    "../",
    "\\",
    ":",
    "é",
    "\u2028",
]


@st.composite
def tweaked(draw: st.DrawFn, value: str | int) -> Any:
    if isinstance(value, int):
        return draw(st.sampled_from([0, -1, 65535, 65536, 10**30, value + 65535, str(value)]))
    tweak = draw(st.sampled_from(TWEAKS))
    at = draw(st.integers(0, len(value)))
    return draw(
        st.sampled_from(
            [value + tweak, tweak + value, value[:at] + tweak + value[at:], value * 40, ""]
        )
    )


@st.composite
def near_valid_documents(draw: st.DrawFn) -> Mutated:
    """A valid document with one to three things wrong with it."""
    name, doc = draw(valid_documents())
    for _ in range(draw(st.integers(1, 3))):
        mappings = list(_mappings(doc, SCHEMA))
        target, schema = draw(st.sampled_from(mappings))
        action = draw(st.sampled_from(["unknown", "known", "replace", "delete", "tweak", "tweak"]))
        leaves = list(_leaves(doc))
        if action == "tweak" and leaves:
            container, key = draw(st.sampled_from(leaves))
            container[key] = draw(tweaked(container[key]))
        elif action == "unknown" and schema is not None:
            target[draw(_unknown_keys(schema))] = draw(hostile_values)
        elif action == "known" and schema:
            target[draw(st.sampled_from(sorted(schema)))] = draw(hostile_values)
        elif action == "replace" and target:
            target[draw(st.sampled_from(list(target)))] = draw(hostile_values)
        elif target:
            del target[draw(st.sampled_from(list(target)))]
    return Mutated(name, doc)


def dump(doc: Any, flow: bool = False) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=flow)


def _dump_or_empty(doc: Any) -> str:
    try:
        return dump(doc)
    except (ValueError, yaml.YAMLError):  # an int past Python's 4300 digits
        return ""


def billion_laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nimage: *a{levels - 1}\n"


# Each of these runs once (test_hostile_texts); the slow ones (PyYAML takes a second
# or two over a deep nesting or 10,000 lines) are left out of the random draws.
HOSTILE_TEXTS = [
    "",
    "---\n",
    "---\n---\n",
    "~\n",
    "- 1\n- 2\n",
    "42\n",
    "'just a string'\n",
    "!!set {a, b}\n",
    "!!python/object/apply:os.system ['touch pwned']\n",
    "ssh: !!python/name:os.system\n",
    "image: !!binary aGVsbG8=\n",
    "<<: {image: 'debian:bookworm'}\n",
    "image: debian:bookworm\nimage: ubuntu:noble\n",
    "ssh: {listen: 22, listen: 23}\n",
    "? [a, b]\n: 1\n",
    "? {a: 1}\n: 1\n",
    "2001-01-01: 1\n",
    "idle_timeout: 2001-13-45\n",
    "%YAML 1.1\n%TAG ! tag:evil,2000:\n---\nimage: !x 1\n",
    "image: &x debian:bookworm\nhostname: *x\n",
    "\ufeffimage: debian:bookworm\n",
    "image: debian:bookworm\x00\n",
    "image: \x1b[31mred\n",
    "image:\tdebian:bookworm\n",
    "ssh:\n  listen: 22\n authorized_keys: []\n",
    "ssh: {listen: " + "9" * 5000 + "}\n",
    "idle_timeout: " + "9" * 5000 + "\n",
    "idle_timeout: '" + "9" * 5000 + "s'\n",
    f"idle_timeout: '{'9' * 5000}s'\nssh: {{listen: 22, authorized_keys: ['{KEY}']}}\n",
    billion_laughs(9),
]
SLOW_TEXTS = [
    "[" * 5000 + "]" * 5000,
    "{a: " * 3000 + "1" + "}" * 3000,
    "- " * 2000 + "x\n",
    "a: " + "b" * 1_000_000 + "\n",
    "x: 1\n" * 10_000,
]
SPLICES = [
    "\x00",
    "\t",
    "\r",
    "\x1b",
    "\ufeff",
    "\u2028",
    "\x85",
    "&a ",
    "*a",
    "!!binary ",
    "<<: ",
    "\n---\n",
    ": :",
    "\n  x: 1\n",
    "\nimage: x\n",
    "'",
    '"',
    "{",
    "[",
]


@st.composite
def spliced(draw: st.DrawFn) -> bytes:
    """A valid document with something put in anywhere."""
    text = dump(draw(valid_documents())[1], draw(st.booleans()))
    at = draw(st.integers(0, len(text)))
    return (text[:at] + draw(st.sampled_from(SPLICES)) + text[at:]).encode()


raw_documents = st.one_of(
    st.sampled_from(HOSTILE_TEXTS).map(str.encode),
    st.builds(billion_laughs, st.integers(1, 12)).map(str.encode),
    st.integers(1, 300).map(lambda n: ("[" * n + "]" * n).encode()),
    st.integers(1, 300).map(lambda n: ("{a: " * n + "1" + "}" * n).encode()),
    st.text().map(str.encode),
    st.binary(),
    spliced(),
)


# ---------------------------------------------------------------- the oracle

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _check_rendering(root: Root, cfg: config.ContainerConfig, rendering: Rendering) -> None:
    paths = root.paths
    for file in rendering.host:
        path = Path(file.path)
        assert path.is_absolute() and os.path.normpath(path) == str(path), path
        assert any(
            path.is_relative_to(d)
            for d in (paths.unit_dir, paths.nspawn_dir, paths.network_dir, Layer.directory(paths))
        ), path
        assert file.text.startswith(GENERATED_MARK), path  # or nspawnctl disowns it later
    for file in rendering.guest:
        assert not file.path.is_absolute() and ".." not in file.path.parts, file.path
        assert os.path.normpath(file.path) == str(file.path), file.path
    machine = paths.machine_dir(cfg.name)
    assert machine.parent == paths.machines_dir
    for file in rendering.all_files(machine):
        assert Path(file.path).is_relative_to(root.path), file.path
        assert not _CONTROL.search(file.text), (file.path, file.text)


def _verify_guest(rendering: Rendering, tmp: Path) -> None:
    """systemd-analyze verify over the guest's units, as verify_units does for the
    host's. The guest's own units named by the document get stubs; its commands
    (sshd, the nspawnctl-* scripts) are the guest's, not this machine's."""
    staging = tmp / "guest-units"
    staging.mkdir()
    units: list[str] = []
    stubs: dict[str, str] = {}
    for file in rendering.guest:
        parts = file.path.parts
        if parts[:3] != ("etc", "systemd", "system") or not file.text:
            continue
        target = staging.joinpath(*parts[3:])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file.text)
        if len(parts) == 4 and "@." not in parts[3]:
            units.append(parts[3])
        for line in file.text.split("\n"):
            if line.startswith(("Requires=", "Wants=", "After=")):
                stubs.setdefault(line.partition("=")[2], "[Service]\nExecStart=/bin/true\n")
        if parts[3].endswith(".d"):
            unit = parts[3].removesuffix(".d")
            stubs[unit] = "[Socket]\nListenStream=1\n"
            stubs[unit.removesuffix(".socket") + ".service"] = "[Service]\nExecStart=/bin/true\n"
    for unit, text in stubs.items():
        if not (staging / unit).exists() and unit.endswith((".service", ".socket")):
            (staging / unit).write_text(text)
    _returncode, lines = systemd_verify(staging, units)
    problems = [
        ln
        for ln in lines
        if ln.strip() and "is not executable: No such file or directory" not in ln
    ]
    assert not problems, problems  # (the exit code counts the missing commands too)


def judge(root: Root, name: str, text: bytes) -> config.ContainerConfig | None:
    """Load one document as `nspawnctl` would; check whichever way it goes."""
    file = root.paths.config_file(name)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(text)
    try:
        try:
            cfg = config.load_config(name, file)
        except ConfigError as err:
            STATS["refused"] += 1
            assert err.message.startswith(str(file)), err.message
            assert err.problem.strip() and "\n" not in err.message, err.message
            assert "Traceback" not in err.message
            return None
        STATS["accepted"] += 1
        rendering = container.rendering_for(root.paths, cfg)
        _check_rendering(root, cfg, rendering)
        if _sample():
            STATS["verified"] += 1
            verify_units(rendering.host, [socket_unit(name), service_unit(name)])
            with tempfile.TemporaryDirectory(dir=root.path) as scratch:
                _verify_guest(rendering, Path(scratch))
        return cfg
    finally:
        file.unlink()


def _sample() -> bool:
    """Every _VERIFY_EVERY-th accepted rendering is verified (a count, not a draw:
    hypothesis favours small numbers, and would verify nearly all)."""
    STATS["sampled"] += 1
    return STATS["sampled"] % _VERIFY_EVERY == 1 or _VERIFY_EVERY == 1


# ---------------------------------------------------------------- documents


@_fuzz(60)
@given(valid_documents(), st.booleans())
def test_valid_documents_are_accepted_and_render_units_systemd_accepts(
    root: Root, case: tuple[str, dict[str, Any]], flow: bool
) -> None:
    name, doc = case
    cfg = judge(root, name, dump(doc, flow).encode())
    assert cfg is not None, doc
    assert cfg.name == name and len(cfg.ssh.authorized_keys) >= 1


@_fuzz(150)
@given(near_valid_documents(), st.booleans())
def test_near_valid_documents_are_accepted_or_refused_clearly(
    root: Root, case: Mutated, flow: bool
) -> None:
    try:
        text = dump(case.doc, flow)
    except (ValueError, yaml.YAMLError):
        return  # not writable as YAML (an int past Python's digit limit): not a case
    cfg = judge(root, case.name, text.encode())
    if case.must_refuse:
        assert cfg is None, text


@_fuzz(150)
@given(raw_documents)
def test_hostile_text_is_refused_or_renders(root: Root, text: bytes) -> None:
    judge(root, "web", text)
    assert not (root.path / "cwd" / "pwned").exists()


@pytest.mark.parametrize("text", HOSTILE_TEXTS + SLOW_TEXTS, ids=lambda t: repr(t[:24]))
def test_hostile_texts(root: Root, text: str) -> None:
    assert judge(root, "web", text.encode()) is None


# ---------------------------------------------------------------- names


hostile_names = st.one_of(
    names,
    st.text(max_size=70),
    st.sampled_from(
        [
            "web\n",
            "web\r",
            "../../etc",
            "..",
            ".",
            "-web",
            "web-",
            "web@1",
            "web.yaml",
            "wéb",
            "\uff57\uff45\uff42",  # fullwidth "web"
            "a" * 63,
            "a" * 64,
            "nspawnctl",
            "web/../x",
            "web\x00",
            " web",
        ]
    ),
)


@_fuzz(400)
@given(hostile_names)
@example("web\n")  # `$` matched before a trailing newline
def test_container_names_are_safe_everywhere_or_refused(root: Root, text: str) -> None:
    try:
        name = machine_name(text)
    except argparse.ArgumentTypeError as err:
        assert str(err).startswith(repr(text)), err
        with pytest.raises(ValueError):
            check_machine_name(text)
        return
    assert name == text
    assert re.fullmatch(r"[A-Za-z0-9-]{1,63}", name) and not name.startswith("-")
    paths = root.paths
    for path in (paths.config_file(name), paths.machine_dir(name)):
        assert path.parent in (paths.config_dir, paths.machines_dir)
        assert path.name.startswith(name) and "/" not in name
    for unit in (socket_unit(name), service_unit(name)):
        assert re.fullmatch(r"[A-Za-z0-9:_.@-]{1,255}", unit)


# ---------------------------------------------------------------- the command line


class Outcome(NamedTuple):
    code: int
    out: str
    err: str


def nspawnctl(*argv: str) -> Outcome:
    """cli.main in this process, as `nspawnctl ARGV...` would run."""
    out, err = io.StringIO(), io.StringIO()
    handlers = list(log.handlers)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(argv))
            except SystemExit as exit:  # argparse's usage errors
                code = int(exit.code or 0)
    finally:
        log.handlers[:] = handlers  # main() adds one each call
    return Outcome(code, out.getvalue(), err.getvalue())


def _walk(root: Root) -> list[tuple[str, int]]:
    return [(p, m) for p, m in _listing(root.path) if not p.startswith(str(root.docs))]


_OPTION_VALUES: dict[str, st.SearchStrategy[str]] = {
    "-f": st.one_of(
        st.just("{doc}"),
        st.sampled_from([*TRAVERSALS, "missing.yaml", "/dev/null"]),
        st.text(max_size=20),
    ),
    "--image": st.one_of(
        st.sampled_from(["debian:bookworm", "template:x", "debian:", ":", "template:../../etc"]),
        st.text(max_size=20),
    ),
    "--ssh": st.one_of(st.sampled_from([str(v) for v in LISTEN_GARBAGE]), st.integers().map(str)),
    "--key": st.one_of(
        st.sampled_from([KEY, "{pub}", *TRAVERSALS, KEY + "\nssh-rsa AAAA"]), st.text(max_size=30)
    ),
}
_JUNK = st.sampled_from(["--bogus", "-x", "--json", "--", "extra", "-f", "--ssh"])


_DIR_NAMES = st.text(st.characters(exclude_characters="/\x00"), min_size=1, max_size=20)


@st.composite
def render_argvs(draw: st.DrawFn) -> list[str]:
    """Command lines of `render`: mostly well-formed with something wrong, some garbage."""
    argv = []
    if draw(st.booleans()):
        argv += ["--config-dir", draw(st.one_of(_DIR_NAMES, st.sampled_from(TRAVERSALS)))]
    if draw(st.booleans()):
        argv.append("--debug")  # an internal error then raises, and fails this test
    shape = draw(st.sampled_from(["file", "options", "garbage"]))
    argv += ["render", draw(names if shape != "garbage" else hostile_names)]
    if shape == "file":
        argv += ["-f", "{doc}"]
    elif shape == "options":
        argv += ["--ssh", draw(st.one_of(ports.map(str), _OPTION_VALUES["--ssh"]))]
        for _ in range(draw(st.integers(1, 2))):
            argv += [
                "--key",
                draw(st.one_of(st.sampled_from([KEY, "{pub}"]), _OPTION_VALUES["--key"])),
            ]
        if draw(st.booleans()):
            argv += ["--image", draw(_OPTION_VALUES["--image"])]
    else:
        for option in draw(st.lists(st.sampled_from(sorted(_OPTION_VALUES)), max_size=4)):
            argv += [option, draw(_OPTION_VALUES[option])]
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(_JUNK))
    # No NUL: no real command line can hold one.
    return [arg.replace("\x00", "") for arg in argv]


def _printed_files(out: str) -> dict[str, str]:
    """`render`'s output back into files: each one is "# PATH", its text, a blank line."""
    files: dict[str, list[str]] = {}
    current: list[str] = []
    previous = ""
    for line in out.removesuffix("\n").split("\n"):  # not splitlines(): \x85 is no break
        if previous == "" and re.fullmatch(r"# /\S+", line):
            current = files.setdefault(line[2:], [])
        else:
            current.append(line)
        previous = line
    return {path: "\n".join(lines).removesuffix("\n") + "\n" for path, lines in files.items()}


@_fuzz(250)
@given(
    render_argvs(),
    st.one_of(
        valid_documents().map(lambda c: dump(c[1])),
        near_valid_documents().map(lambda m: _dump_or_empty(m.doc)),
        st.sampled_from(HOSTILE_TEXTS),
    ),
)
@example(["render", "web", "-f", "/dev/zero"], "")  # was read forever
@example(["render", "web", "--ssh", "22", "--key", "/dev/zero"], "")
@example(["--config-dir", "a\nb", "render", "web", "--ssh", "22", "--key", KEY], "")
@example(["--config-dir", "\x85", "render", "web", "--ssh", "22", "--key", KEY], "")
def test_render_command_line_succeeds_or_fails_cleanly(
    root: Root, argv: list[str], document: str
) -> None:
    doc = root.docs / "doc.yaml"
    doc.write_text(document)
    argv = [a.replace("{doc}", str(doc)).replace("{pub}", str(root.docs / "id.pub")) for a in argv]
    before = _walk(root)
    result = nspawnctl(*argv)
    assert _walk(root) == before, argv  # render touches nothing
    # An internal error is one line, or with --debug an exception out of main().
    assert "internal error" not in result.err, result.err
    assert "--debug" in argv or "Traceback" not in result.err, result.err
    assert result.code in (0, 2), (argv, result)
    if result.code == 0:
        STATS["cli accepted"] += 1
        files = _printed_files(result.out)
        name = argv[argv.index("render") + 1]
        assert str(root.paths.unit_dir / socket_unit(name)) in files, result.out
        for path, text in files.items():
            assert Path(path).is_relative_to(root.path), path
            assert not _CONTROL.search(text), (path, text)
        host = [
            RenderedFile(PurePosixPath(p), text)
            for p, text in files.items()
            if not Path(p).is_relative_to(root.paths.machines_dir)
        ]
        for file in host:
            assert file.text.startswith(GENERATED_MARK), file
            keys = file.path.name == "authorized_keys.root"  # a comment or a key per line
            assert keys or all(
                not ln or ln.startswith(("#", "[")) or "=" in ln for ln in file.text.split("\n")
            ), file  # every line a comment, a section or a setting
        if _sample():
            STATS["verified"] += 1
            verify_units(host, [socket_unit(name), service_unit(name)])
    else:
        STATS["cli refused"] += 1
        errors = [ln for ln in result.err.splitlines() if ln.startswith("nspawnctl: error: ")]
        assert len(errors) == 1 and len(errors[0]) > len("nspawnctl: error: "), result.err
        assert not result.out, result.out


# ---------------------------------------------------------------- what fuzzing found

SSH = f"ssh: {{listen: 22, authorized_keys: ['{KEY}']}}\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # tracebacks: RecursionError, and ValueError from PyYAML's constructors
        # (libyaml's parser does not recurse: the document is then just not a mapping)
        pytest.param(
            "[" * 2000 + "]" * 2000,
            "nested too deeply"
            if yamlfile._SafeLoader is yaml.SafeLoader
            else "expected a mapping",
            id="deep-nesting",
        ),
        pytest.param(
            "ssh: {listen: " + "9" * 5000 + "}\n",
            "not valid YAML: Exceeds the limit",
            id="huge-int",
        ),
        pytest.param(
            "idle_timeout: 2001-13-45\n" + SSH,
            "not valid YAML: month must be in 1..12",
            id="bad-date",
        ),
        pytest.param(
            f"idle_timeout: '{'9' * 5000}s'\n" + SSH, "longer than 7 days", id="huge-span"
        ),
        # messages of two lines: naming "<unicode string>"; quoting a key as it is
        pytest.param("image: \x1f\n", "characters are not allowed", id="control-char"),
        pytest.param('"\\n": 1\n' + SSH, "'\\n': unknown key", id="key-with-newline"),
        # accepted, and then units systemd rejects or files named with a line break
        pytest.param(
            "ssh: {listen: '[fe80::1%eth0]:22', authorized_keys: [x]}", "zone index", id="ipv6-zone"
        ),
        pytest.param(
            "ssh: {listen: '\u00b2\u00b2', authorized_keys: [x]}",
            "not a port or ADDRESS:PORT",
            id="superscript-port",
        ),
        pytest.param('hostname: "web\\n"\n' + SSH, "not a valid hostname", id="hostname-newline"),
        pytest.param(
            'image: "debian:bookworm\\n"\n' + SSH, "not a release name", id="release-newline"
        ),
        pytest.param(
            'image: "template:base\\n"\n' + SSH, "not a template name", id="template-newline"
        ),
        pytest.param(
            'bootstrap: {packages: ["vim\\n"]}\n' + SSH, "not a package name", id="package-newline"
        ),
        pytest.param(
            'network: "bridge:br0\\n"\n' + SSH, "is not a bridge name", id="bridge-newline"
        ),
        pytest.param(
            'idle_timeout: 60\nkeep_awake: ["a.service\\n"]\n' + SSH,
            "not a service unit name",
            id="keep-awake-newline",
        ),
        pytest.param(
            "sockets: [{listen: 80, to: 80, service: a@.service}]\n" + SSH,
            "not a service unit",
            id="bare-template-service",
        ),
        pytest.param(
            "sockets: [{listen: 80, to: 80, service: '@.service'}]\n" + SSH,
            "not a service unit",
            id="empty-prefix-service",
        ),
        pytest.param(
            f"sockets: [{{listen: 80, native: {'x' * 300}.socket}}]\n" + SSH,
            "not a socket unit",
            id="long-native",
        ),
        pytest.param(
            f'ssh: {{listen: 22, authorized_keys: ["{KEY}\\rx"]}}',
            "single line of printable",
            id="key-carriage-return",
        ),
        pytest.param(
            f'ssh: {{listen: 22, authorized_keys: ["{KEY}\\e[2J"]}}',
            "single line of printable",
            id="key-escape",
        ),
        # read forever; and a RuntimeError from expanduser()
        pytest.param(
            "ssh: {listen: 22, authorized_keys: [/dev/zero]}", "nor a regular file", id="key-device"
        ),
        pytest.param(
            "ssh: {listen: 22, authorized_keys: ['~nosuchuser/k.pub']}",
            "(no such user)",
            id="key-no-such-user",
        ),
    ],
)
def test_found_by_fuzzing_is_refused_clearly(root: Root, text: str, problem: str) -> None:
    file = root.paths.config_file("web")
    file.write_text(text)
    try:
        with pytest.raises(ConfigError) as caught:
            config.load_config("web", file)
    finally:
        file.unlink()
    assert problem in caught.value.message and "\n" not in caught.value.message


def test_a_name_with_a_line_break_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        machine_name("web\n")  # `$` matches before a final line break; `\Z` does not


def test_render_refuses_a_device_as_its_file(root: Root) -> None:
    result = nspawnctl("render", "web", "-f", "/dev/zero")  # was read until memory ran out
    assert result.code == 2 and "larger than 1 MiB" in result.err


def test_render_refuses_a_config_dir_with_a_line_break(root: Root) -> None:
    # The path heads every rendered file, shell scripts too: a line of its own there
    # would run as a command in the guest.
    result = nspawnctl("--config-dir", "x\nreboot", "render", "web", "--ssh", "22", "--key", KEY)
    assert result.code == 2 and "control characters" in result.err


def test_a_relative_config_dir_renders_units_systemd_accepts(root: Root) -> None:
    result = nspawnctl("--config-dir", "../x/..", "render", "web", "--ssh", "22", "--key", KEY)
    assert result.code == 0, result.err
    files = _printed_files(result.out)
    socket = files[str(root.paths.unit_dir / "nspawnctl-web.socket")]
    assert f"SourcePath={root.path}/web.yaml\n" in socket  # normalized, or systemd ignores it
    machines = root.paths.machines_dir
    host = [
        RenderedFile(PurePosixPath(p), t)
        for p, t in files.items()
        if not Path(p).is_relative_to(machines)
    ]
    verify_units(host, [socket_unit("web"), service_unit("web")])
