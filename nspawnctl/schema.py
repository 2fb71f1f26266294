"""The YAML's keys, each declared once: a key is a field of the model that carries its
row, how the key is read and how it is written back. Parsing, the unknown-key check, the
YAML that `add` writes and the documentation test all go through the rows.

A key is added by adding a field, e.g. to `SshConfig`:

    banner: str | None = key(_banner, default=None)

where `_banner(section, name)` reads and checks the value, and a line in the
template that uses it (`config.ssh.banner`)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from nspawnctl.errors import ConfigError
from nspawnctl.yamlfile import type_name

# Keys that a later version will understand. Until then they are errors like any
# unknown key, but with an honest message instead of "did you mean".
PLANNED_KEYS = frozenset({"binds"})

_ROW = "nspawnctl.key"


class Section:
    """One mapping of the file, with the keys it may hold. Unknown keys are reported
    first, so a misspelt key gets "did you mean", not "the right key is missing"."""

    def __init__(
        self, file: Path, prefix: str, data: Mapping[Any, Any], known: tuple[str, ...], name: str
    ) -> None:
        self.file = file
        self.prefix = prefix
        self.data = dict(data)
        self.name = name  # the container's: some defaults are made of it (hostname)
        for key in self.data:
            self._check_known(str(key), known)

    def _check_known(self, key: str, known: tuple[str, ...]) -> None:
        if key in known:
            return
        if not self.prefix and key in PLANNED_KEYS:
            self.fail(
                key,
                "is not supported by this version of nspawnctl yet",
                hint="see nspawnctl.yaml(5) for the keys it understands",
            )
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        self.fail(
            key,
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
            expected = " or ".join(type_name(t()) for t in types)
            self.fail(key, f"{value!r} is a {type_name(value)}, expected a {expected}")
        return value

    def below(self, key: str, known: tuple[str, ...], *, required: bool = False) -> Section:
        """The mapping under `key` (empty if the key is not there)."""
        value = self.take(key, dict, required=required)
        return Section(self.file, self.path(key), value or {}, known, self.name)


Parse = Callable[[Section, str], Any]


def _as_is(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Row:
    parse: Parse  # reads its key from the section; called only when the key is there,
    # or when the field has no default (then it says "is required", or makes one)
    dump: Callable[[Any], Any] = _as_is  # the key's value in the YAML `add` writes
    # For a mapping (`ssh`) or a list of them (`sockets`): the model class of its keys.
    below: type | None = None
    many: bool = False
    # A row whose field is made of several keys (`image` and `bootstrap`): each key with
    # the keys under it. Its parse is always called; its dump returns those keys.
    keys: Mapping[str, tuple[str, ...]] | None = None
    # Whether a value is the default given the model it is in (hostname: the name).
    is_default: Callable[[Any, Any], bool] | None = None


def key(
    parse: Parse,
    *,
    default: Any = dataclasses.MISSING,
    factory: Any = dataclasses.MISSING,
    dump: Callable[[Any], Any] = _as_is,
    keys: Mapping[str, tuple[str, ...]] | None = None,
    is_default: Callable[[Any, Any], bool] | None = None,
) -> Any:
    """A field that is a key of the YAML."""
    row = Row(parse, dump, keys=keys, is_default=is_default)
    return dataclasses.field(default=default, default_factory=factory, metadata={_ROW: row})


def mapping(cls: type, *, required: bool = False) -> Any:
    """A field that is a mapping of keys, those of the fields of `cls`."""

    def parse(section: Section, name: str) -> Any:
        return parse_mapping(cls, section.below(name, keys_of(cls), required=required))

    row = Row(parse, below=cls)
    if required:
        return dataclasses.field(metadata={_ROW: row})
    return dataclasses.field(default_factory=cls, metadata={_ROW: row})


def mappings(cls: type, *, example: str) -> Any:
    """A field that is a list of mappings, each with the keys of the fields of `cls`."""

    def parse(section: Section, name: str) -> tuple[Any, ...]:
        items = section.take(name, list) or []
        parsed = []
        for index, item in enumerate(items):
            where = f"{name}[{index}]"
            if not isinstance(item, dict):
                section.fail(
                    where, f"{item!r} is a {type_name(item)}, expected a mapping", hint=example
                )
            below = Section(section.file, section.path(where), item, keys_of(cls), section.name)
            parsed.append(parse_mapping(cls, below))
        return tuple(parsed)

    return dataclasses.field(default=(), metadata={_ROW: Row(parse, below=cls, many=True)})


def rows(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Row]]:
    for field in dataclasses.fields(cls):
        if _ROW in field.metadata:
            yield field, field.metadata[_ROW]


def keys_of(cls: type) -> tuple[str, ...]:
    """The keys one mapping of `cls` may hold."""
    return tuple(k for field, row in rows(cls) for k in (row.keys or {field.name: ()}))


def known_keys(cls: type, prefix: str = "") -> Iterator[str]:
    """Every key under `cls`, dotted as the man page names it (`sockets[].listen`)."""
    for field, row in rows(cls):
        if row.keys:
            for name, below in row.keys.items():
                yield from (f"{prefix}{name}.{b}" for b in below) if below else [prefix + name]
        elif row.below:
            yield from known_keys(row.below, f"{prefix}{field.name}{'[].' if row.many else '.'}")
        else:
            yield prefix + field.name


def dotted_keys(data: Mapping[Any, Any], prefix: str = "") -> Iterator[str]:
    """The keys a YAML document uses, dotted as known_keys names them."""
    for name, value in data.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            yield from dotted_keys(value, f"{path}.")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                yield from dotted_keys(item, f"{path}[].")
        else:
            yield path


def parse_mapping(cls: type, section: Section, **given: Any) -> Any:
    """An instance of `cls` from its keys in `section`; `given`: its fields that are no
    keys. A key that is not there gets its field's default."""
    values = dict(given)
    for field, row in rows(cls):
        has_default = not (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if row.keys or field.name in section.data or not has_default:
            values[field.name] = row.parse(section, field.name)
    made = cls(**values)
    check: Callable[[Section], None] | None = getattr(made, "check", None)
    if check is not None:
        check(section)  # what holds between its keys
    return made


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def dump_mapping(model: Any) -> dict[str, Any]:
    """The YAML data of a model: every key that is not its default."""
    data: dict[str, Any] = {}
    for field, row in rows(type(model)):
        value = getattr(model, field.name)
        if row.keys:
            data.update(row.dump(value))
        elif row.is_default(value, model) if row.is_default else value == _default(field):
            continue
        elif row.below and row.many:
            data[field.name] = [dump_mapping(item) for item in value]
        elif row.below:
            data[field.name] = dump_mapping(value)
        else:
            data[field.name] = row.dump(value)
    return data
