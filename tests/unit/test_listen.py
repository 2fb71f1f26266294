from __future__ import annotations

import pytest

from nspawnctl.listen import Listen


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        (2222, "2222"),
        ("2222", "2222"),
        ("127.0.0.1:2222", "127.0.0.1:2222"),
        ("[::1]:2222", "[::1]:2222"),
        ("[0:0::1]:80", "[::1]:80"),
        ("0.0.0.0:22", "0.0.0.0:22"),
    ],
)
def test_unit_value_is_normalised(value: int | str, unit: str) -> None:
    assert Listen.parse(value).unit_value() == unit


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "not a port"),
        (65536, "not a port"),
        ("1.2.3.4:99999", "not a port"),
        ("::1:22", "in brackets"),
        ("host.example:22", "not an IP address"),
        ("22/tcp", "not a port or ADDRESS:PORT"),
        ("", "not a port or ADDRESS:PORT"),
    ],
)
def test_bad_values_say_why(value: int | str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Listen.parse(value)


@pytest.mark.parametrize(
    ("a", "b", "clash"),
    [
        ("2222", "2222", True),
        ("2222", "2223", False),
        ("2222", "127.0.0.1:2222", True),  # [::]:2222 is dual-stack: it takes IPv4 too
        ("0.0.0.0:2222", "127.0.0.1:2222", True),
        ("0.0.0.0:2222", "[::1]:2222", False),
        ("[::]:2222", "127.0.0.1:2222", True),
        ("127.0.0.1:2222", "127.0.0.2:2222", False),
        ("[::1]:2222", "[::1]:2222", True),
    ],
)
def test_overlaps_is_symmetric(a: str, b: str, clash: bool) -> None:
    la, lb = Listen.parse(a), Listen.parse(b)
    assert la.overlaps(lb) is clash
    assert lb.overlaps(la) is clash
