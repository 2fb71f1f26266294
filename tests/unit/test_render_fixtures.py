"""Rendering as data: each tests/unit/render/NAME.yaml is a container's YAML whose `##`
lines assert on the files `add` would write for container NAME (in the manner of
Quadlet's test cases). Units are read with a parser that keeps repeated keys, so
`ExecStart=` and `ListenStream=` are checked whole. Together the fixtures render every
template and use every YAML key.

    ## assert-key-is FILE SECTION KEY VALUE       the key's only value
    ## assert-key-has FILE SECTION KEY VALUE      one of its values (VALUE may be empty)
    ## assert-key-contains FILE SECTION KEY TEXT  one of its values contains TEXT
    ## assert-key-none FILE SECTION KEY           the key is not set
    ## assert-line FILE TEXT                      a line of the file is TEXT
    ## assert-empty FILE                          an empty file (a masked unit)
    ## assert-absent FILE                         not written for this YAML
    ## assert-mode FILE MODE OWNER                octal mode, owner's uid

FILE is the end of the file's path on the host (a guest file's is under
/var/lib/machines/NAME)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from nspawnctl import config
from nspawnctl.config import ContainerConfig, parse_config
from nspawnctl.paths import Paths
from nspawnctl.render import (
    _WHEN,
    METRICS_TEMPLATES,
    MachineState,
    RenderedFile,
    data_dir,
    host_targets,
    render,
)
from nspawnctl.schema import dotted_keys
from tests.unit.unitfile import read_unit

FIXTURES = Path(__file__).parent / "render"
MACHINE_ID = "0123456789abcdef0123456789abcdef"
UID_BASE = 0x00AB0000  # 11206656, the guest's root on the host
IMAGE_VERSION = Path("/var/lib/nspawnctl/images/debian-x/v3")


def fixture_config(path: Path) -> ContainerConfig:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return parse_config(path.stem, data, Path(f"/etc/nspawnctl/{path.stem}.yaml"))


def rendered(path: Path) -> dict[str, RenderedFile]:
    container = fixture_config(path)
    uid_base = UID_BASE if container.security.user_namespace else 0
    state = MachineState(MACHINE_ID, IMAGE_VERSION, uid_base)
    rendering = render(container, Paths.from_env({}), state)
    machine_dir = Path(f"/var/lib/machines/{container.name}")
    return {str(f.path): f for f in rendering.all_files(machine_dir)}


def one(files: dict[str, RenderedFile], end: str) -> RenderedFile:
    found = [f for path, f in files.items() if path.endswith(end)]
    assert len(found) == 1, f"{end}: {len(found)} files end so, not 1"
    return found[0]


def _key(files: dict[str, RenderedFile], args: list[str]) -> list[str]:
    end, section, key = args[:3]
    return read_unit(one(files, end).text)[section][key]


Check = Callable[[dict[str, RenderedFile], list[str]], None]


def _is(files: dict[str, RenderedFile], args: list[str]) -> None:
    assert _key(files, args) == [" ".join(args[3:])], args


def _has(files: dict[str, RenderedFile], args: list[str]) -> None:
    assert " ".join(args[3:]) in _key(files, args), (args, _key(files, args))


def _contains(files: dict[str, RenderedFile], args: list[str]) -> None:
    text = " ".join(args[3:])
    assert any(text in value for value in _key(files, args)), (args, _key(files, args))


def _none(files: dict[str, RenderedFile], args: list[str]) -> None:
    assert _key(files, args) == [], args


def _line(files: dict[str, RenderedFile], args: list[str]) -> None:
    assert " ".join(args[1:]) in one(files, args[0]).text.splitlines(), args


def _empty(files: dict[str, RenderedFile], args: list[str]) -> None:
    assert one(files, args[0]).text == "", args


def _absent(files: dict[str, RenderedFile], args: list[str]) -> None:
    assert not [path for path in files if path.endswith(args[0])], args


def _mode(files: dict[str, RenderedFile], args: list[str]) -> None:
    file = one(files, args[0])
    assert (oct(file.mode), file.owner) == (oct(int(args[1], 8)), int(args[2])), args


CHECKS: dict[str, Check] = {
    "assert-key-is": _is,
    "assert-key-has": _has,
    "assert-key-contains": _contains,
    "assert-key-none": _none,
    "assert-line": _line,
    "assert-empty": _empty,
    "assert-absent": _absent,
    "assert-mode": _mode,
}


def assertions(path: Path) -> Iterator[tuple[str, list[str]]]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## assert-"):
            check, *args = line.removeprefix("## ").split(" ")
            yield check, args


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_fixture(path: Path) -> None:
    files = rendered(path)
    checks = list(assertions(path))
    assert checks, f"{path.name} asserts nothing"
    for check, args in checks:
        assert check in CHECKS, f"{path.name}: unknown assertion {check}"
        CHECKS[check](files, args)


def _templates(kind: str) -> list[str]:
    root = data_dir(kind)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.j2"))


def _rendered_by(template: str, kind: str, name: str, paths: set[str]) -> bool:
    if kind == "units":
        return str(host_targets(Paths.from_env({}), name)[template]) in paths
    # A guest file; {proxy.index} and {native.unit} stand for any one name.
    pattern = re.sub(r"\\\{[a-z]+\\\.[a-z]+\\\}", "[^/]+", re.escape(template.removesuffix(".j2")))
    return any(re.fullmatch(f"/var/lib/machines/{name}/{pattern}", p) for p in paths)


@pytest.mark.parametrize(
    ("kind", "template"),
    [
        (kind, t)
        for kind in ("units", "guest-skel")
        for t in _templates(kind)
        if t not in METRICS_TEMPLATES  # the host's, rendered in test_metrics.py
    ],
)
def test_every_template_is_rendered_by_a_fixture(kind: str, template: str) -> None:
    assert any(
        _rendered_by(template, kind, path.stem, set(rendered(path)))
        for path in FIXTURES.glob("*.yaml")
    ), f"no fixture in {FIXTURES} renders {kind}/{template}"


def test_the_fixtures_use_every_yaml_key() -> None:
    used = {
        key
        for path in FIXTURES.glob("*.yaml")
        for key in dotted_keys(yaml.safe_load(path.read_text(encoding="utf-8")))
    }
    assert set(config.KNOWN_KEYS) - used == set()


def test_every_condition_names_a_template() -> None:
    """A template written only for some containers is named in render._WHEN: a name
    there that is no template would leave the real one rendered for every container."""
    templates = set(_templates("units")) | set(_templates("guest-skel"))
    assert set(_WHEN) - templates == set()
