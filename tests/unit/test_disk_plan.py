"""What `apply` and `set` do with `resources.disk` of an existing container, as pure
logic over a layer directory (the disk itself: tests/integration/test_disk.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nspawnctl.config import ContainerConfig, parse_config
from nspawnctl.errors import ConfigError
from nspawnctl.layers import Layer
from nspawnctl.reconcile import _disk_change

FILE = Path("/etc/nspawnctl/web.yaml")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGs5bW9yZQ alice@laptop"


def config(**resources: object) -> ContainerConfig:
    data: dict[str, object] = {"ssh": {"listen": 2222, "authorized_keys": [KEY]}}
    if resources:
        data["resources"] = resources
    return parse_config("web", data, FILE)


@pytest.fixture
def layer(tmp_path: Path) -> Layer:
    layer = Layer(tmp_path / "web")
    layer.path.mkdir()
    return layer


def with_disk(layer: Layer, size: int) -> Layer:
    with open(layer.path / "disk.ext4", "wb") as f:
        f.truncate(size)  # sparse: only its size is read here
    return layer


def test_a_new_size_is_a_resize_and_the_same_size_is_none(layer: Layer) -> None:
    with_disk(layer, 200 << 20)
    installed = config(disk="200M")
    assert _disk_change(config(disk="400M"), installed, layer) == 400 << 20
    assert _disk_change(config(disk="200M"), installed, layer) is None
    # The YAML already says 400M, the disk is 200M (a resize that failed): done again.
    assert _disk_change(config(disk="400M"), config(disk="400M"), layer) == 400 << 20


def test_a_disk_is_neither_given_nor_taken_after_the_container_is_made(layer: Layer) -> None:
    with pytest.raises(ConfigError, match="made without a disk") as err:
        _disk_change(config(disk="1G"), config(), layer)
    assert err.value.key == "resources.disk"
    with_disk(layer, 1 << 30)
    with pytest.raises(ConfigError, match="it keeps one"):
        _disk_change(config(), config(disk="1G"), layer)
    with pytest.raises(ConfigError, match="fixed when the container's disk is made") as err:
        _disk_change(config(disk="1G", inodes=5000), config(disk="1G"), layer)
    assert err.value.key == "resources.inodes"


def test_no_container_yet_and_no_disk_are_no_change(layer: Layer) -> None:
    assert _disk_change(config(disk="1G"), None, layer) is None
    assert _disk_change(config(), config(), layer) is None
