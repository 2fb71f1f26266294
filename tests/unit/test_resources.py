"""resources: and security: keys, from YAML values to unit lines and D-Bus values."""

from __future__ import annotations

from pathlib import Path

import pytest

from nspawnctl.config import parse_config
from nspawnctl.errors import ConfigError
from nspawnctl.resources import Resources
from nspawnctl.security import capability_name

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1ZxOPXy4yQ3jmU1rwM7DHNmtyvjRqxVVk4Hfbk6YwN a"
FILE = Path("/etc/nspawnctl/web.yaml")


def config_with(**extra: object) -> dict[str, object]:
    return {"ssh": {"listen": 2222, "authorized_keys": [KEY]}, **extra}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("memory", "256M", 256 << 20),
        ("memory", "1G", 1 << 30),
        ("memory", "2GiB", 2 << 30),
        ("memory", 64 << 20, 64 << 20),
        ("cpu", "20%", 20),
        ("cpu", "250%", 250),
        ("tasks", 300, 300),
        ("io_weight", 1, 1),
        ("disk", "200M", 200 << 20),
        ("disk", "2G", 2 << 30),
        ("inodes", 100000, 100000),
    ],
)
def test_values_are_read_as_systemd_reads_them(key: str, value: object, expected: int) -> None:
    assert getattr(Resources().with_value(key, value), key) == expected


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("memory", -5, "less than 16M"),
        ("memory", "1M", "less than 16M"),
        ("memory", "lots", "not a size"),
        ("memory", True, "not a size"),
        ("memory", "9999999T", "more than any machine has"),
        ("cpu", 50, "not a percentage"),
        ("cpu", "0%", "expected 1% to 102400%"),
        ("tasks", "300", "not a whole number"),
        ("tasks", 2, "expected 16 to 4194304"),
        ("io_weight", 0, "expected 1 to 10000"),
        ("io_weight", 1.5, "not a whole number"),
        # The bad values: each names what is wrong (the key comes from config.py).
        ("disk", 10, "less than 64M"),
        ("disk", "-1G", "not a size"),
        ("disk", "lots", "not a size"),
        ("inodes", 10, "expected 1024 to"),
    ],
)
def test_bad_values_say_what_is_wrong(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Resources().with_value(key, value)


def test_unit_lines_and_yaml_say_the_same() -> None:
    resources = Resources(memory=256 << 20, cpu=20, tasks=300, io_weight=50)
    assert resources.unit_lines() == [
        "MemoryMax=268435456",
        "CPUQuota=20%",
        "TasksMax=300",
        "IOWeight=50",
    ]
    assert resources.yaml_data() == {"memory": "256M", "cpu": "20%", "tasks": 300, "io_weight": 50}


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("web", config_with(resources={"memory": -5}), FILE)
    assert err.value.key == "resources.memory"
    with pytest.raises(ConfigError) as err:
        parse_config("web", config_with(resources={"swap": "1G"}), FILE)
    assert err.value.problem == "unknown key"
    with pytest.raises(ConfigError) as err:
        parse_config("web", config_with(security={"drop_capabilities": ["CAP_NOPE"]}), FILE)
    assert err.value.key == "security.drop_capabilities[0]"


@pytest.mark.parametrize("value", [10, "-1G", "lots"])
def test_a_bad_disk_is_an_error_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("web", config_with(resources={"disk": value}), FILE)
    assert err.value.key == "resources.disk"
    assert repr(value) in err.value.problem


def test_inodes_without_a_disk_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("web", config_with(resources={"inodes": 5000}), FILE)
    assert err.value.key == "resources.inodes"
    assert err.value.hint == "give resources.disk too"


def test_capabilities_in_any_spelling() -> None:
    assert capability_name("net_raw") == "CAP_NET_RAW"
    assert capability_name("CAP_SYS_ADMIN") == "CAP_SYS_ADMIN"
    with pytest.raises(ValueError, match="not a Linux capability"):
        capability_name("CAP_NOPE")
    config = parse_config(
        "web", config_with(security={"drop_capabilities": ["net_raw", "CAP_NET_RAW"]}), FILE
    )
    assert config.security.drop_capabilities == ("CAP_NET_RAW",)
    assert config.security.user_namespace is True


def test_the_disk_keys_are_no_unit_lines() -> None:
    resources = Resources(memory=256 << 20, disk=1 << 30, inodes=50000)
    assert resources.unit_lines() == ["MemoryMax=268435456"]
    assert resources.yaml_data() == {"memory": "256M", "disk": "1G", "inodes": 50000}
