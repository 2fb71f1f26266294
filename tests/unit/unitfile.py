"""Unit files as data, for tests: every value of a repeated key is kept (configparser
keeps only the last `ExecStart=` or `ListenStream=`)."""

from __future__ import annotations

from collections import defaultdict

Unit = dict[str, dict[str, list[str]]]


def read_unit(text: str) -> Unit:
    """Sections of keys, each with every value it was given, in order."""
    unit: Unit = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a unit file line: {raw!r}"
        unit[section][key.strip()].append(value.strip())
    return unit


def single_values(text: str) -> dict[str, dict[str, str]]:
    """Each key's value; a key given more than once has all of them, a line each, so
    that comparing it with one value fails instead of seeing only the last."""
    return {
        section: {key: "\n".join(values) for key, values in keys.items()}
        for section, keys in read_unit(text).items()
    }
