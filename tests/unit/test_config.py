from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nspawnctl.config import ContainerConfig, dump_config, load_yaml, parse_config
from nspawnctl.conflicts import check_conflicts
from nspawnctl.errors import ConfigError

FILE = Path("/etc/nspawnctl/web.yaml")


def good(pubkey: Path, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "image": "debian:bookworm",
        "ssh": {"listen": 2222, "authorized_keys": [str(pubkey)]},
    }
    data.update(overrides)
    return data


def error_of(name: str, data: Any, file: Path = FILE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(name, data, file)
    return info.value


def test_minimal_file_parses(pubkey: Path) -> None:
    config = parse_config("web", good(pubkey), FILE)
    assert config.hostname == "web"
    assert config.image.image == "debian:bookworm"
    assert config.ssh.listen.unit_value() == "2222"
    assert config.ssh.authorized_keys == (pubkey.read_text().strip(),)


def test_key_line_inline_and_relative_key_file(pubkey: Path) -> None:
    line = pubkey.read_text().strip()
    data = good(pubkey, ssh={"listen": "[::1]:22", "authorized_keys": [line, pubkey.name]})
    config = parse_config("web", data, pubkey.parent / "web.yaml")
    assert config.ssh.authorized_keys == (line,)  # the same key twice is kept once


def test_misspelt_key_says_did_you_mean(pubkey: Path) -> None:
    err = error_of("web", good(pubkey, ssh={"listn": 2222, "authorized_keys": [str(pubkey)]}))
    assert err.key == "ssh.listn"
    assert err.file == str(FILE)
    assert "did you mean 'ssh.listen'" in (err.hint or "")


def test_unknown_top_key_lists_known_keys(pubkey: Path) -> None:
    err = error_of("web", good(pubkey, zzz=1))
    assert err.key == "zzz" and "unknown key" in err.message
    assert "image" in (err.hint or "")


def test_planned_key_is_an_honest_error(pubkey: Path) -> None:
    err = error_of("web", good(pubkey, binds=["/srv/data:/data:ro"]))
    assert "not supported by this version" in err.message


@pytest.mark.parametrize(
    ("ssh", "key", "problem"),
    [
        ({"listen": 70000}, "ssh.listen", "not a port"),
        ({"listen": True}, "ssh.listen", "is a boolean"),
        ({"listen": [22]}, "ssh.listen", "is a list"),
        ({}, "ssh.listen", "is required"),
    ],
)
def test_bad_ssh_values(pubkey: Path, ssh: dict[str, Any], key: str, problem: str) -> None:
    err = error_of("web", good(pubkey, ssh={"authorized_keys": [str(pubkey)], **ssh}))
    assert err.key == key
    assert problem in err.message


def test_private_key_is_refused(pubkey: Path) -> None:
    private = pubkey.with_suffix("")
    err = error_of("web", good(pubkey, ssh={"listen": 22, "authorized_keys": [str(private)]}))
    assert err.key == "ssh.authorized_keys[0]"
    assert "private key" in err.message


def test_missing_key_file(pubkey: Path) -> None:
    err = error_of("web", good(pubkey, ssh={"listen": 22, "authorized_keys": ["/nonexistent"]}))
    assert "No such file" in err.message


@pytest.mark.parametrize("name", ["../etc", "a/b", "-x", "x-", "", "a" * 64, "web.1", "wé"])
def test_bad_names(pubkey: Path, name: str) -> None:
    assert error_of(name, good(pubkey)).key == "name"


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("ubuntu", "<distro>:<release>"),
        ("debian:Bad!", "not a release"),
        ("arch:latest", "not a distribution"),
        ("template:../x", "not a template name"),
    ],
)
def test_bad_image(pubkey: Path, image: str, problem: str) -> None:
    err = error_of("web", good(pubkey, image=image))
    assert err.key == "image" and problem in err.message


@pytest.mark.parametrize(
    ("image", "bootstrap", "key", "problem"),
    [
        ("debian:bookworm", {"method": "dnf"}, "bootstrap.method", "built with debootstrap"),
        ("debian:bookworm", {"method": "zypper"}, "bootstrap.method", "not a bootstrap method"),
        ("template:app", {"method": "tar"}, "bootstrap.source", "required"),
        ("template:app", {"method": "debootstrap"}, "bootstrap.method", "cannot build a template"),
        ("debian:bookworm", {"source": "/x.tar"}, "bootstrap.source", "only for"),
        (
            "debian:bookworm",
            {"packages": ["ok", "no way"]},
            "bootstrap.packages[1]",
            "not a package",
        ),
        ("debian:bookworm", {"mirrors": "x"}, "bootstrap.mirrors", "unknown key"),
    ],
)
def test_bad_bootstrap(
    pubkey: Path, image: str, bootstrap: dict[str, Any], key: str, problem: str
) -> None:
    err = error_of("web", good(pubkey, image=image, bootstrap=bootstrap))
    assert (err.key, problem in err.message) == (key, True), err.message


def test_recipes_decide_the_image(pubkey: Path) -> None:
    plain = parse_config("a", good(pubkey), FILE).image
    same = parse_config("b", good(pubkey, bootstrap={"method": "debootstrap"}), FILE).image
    more = parse_config("c", good(pubkey, bootstrap={"packages": ["nginx"]}), FILE).image
    tar = parse_config(
        "d",
        good(pubkey, image="template:app", bootstrap={"method": "tar", "source": "app.tar.zst"}),
        FILE,
    ).image
    assert plain.key == same.key != more.key
    assert more.packages == ("nginx",)
    assert (tar.method, tar.key, tar.source) == (
        "tar",
        "template-app",
        "/etc/nspawnctl/app.tar.zst",
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("a: &x [1]\nb: *x\n", "aliases"),
        ("- 1\n- 2\n", "is a list, expected a mapping"),
        ("a: [\n", "not valid YAML: line"),
        ("just a string", "is a string"),
    ],
)
def test_hostile_yaml(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_yaml(text, FILE)


def test_port_used_by_another_container(pubkey: Path) -> None:
    web = parse_config("web", good(pubkey), FILE)
    db = parse_config("db", good(pubkey), Path("/etc/nspawnctl/db.yaml"))
    with pytest.raises(ConfigError) as info:
        check_conflicts(db, [web])
    assert info.value.key == "ssh.listen"
    assert "port 2222 is already used by container 'web'" in info.value.message
    check_conflicts(web, [web])  # a container does not clash with itself


def test_dump_round_trips(pubkey: Path) -> None:
    config = parse_config("web", good(pubkey, hostname="www"), FILE)
    again: ContainerConfig = parse_config("web", load_yaml(dump_config(config), FILE), FILE)
    assert again == config


def sockets_of(pubkey: Path, sockets: Any, network: Any = "private") -> Any:
    return parse_config("web", good(pubkey, sockets=sockets, network=network), FILE)


@pytest.mark.parametrize(
    ("value", "problem"),
    [("0s", "'0s' is 0 s: expected 1 s to 7 days"), ("soon", "'soon' is not a time span")],
)
def test_bad_stop_timeout(pubkey: Path, value: str, problem: str) -> None:
    err = error_of("web", good(pubkey, stop_timeout=value))
    assert err.key == "stop_timeout" and err.message.endswith(f"stop_timeout: {problem}")


def test_stop_timeout_defaults_to_60_s_and_takes_a_span(pubkey: Path) -> None:
    assert parse_config("web", good(pubkey), FILE).stop_timeout == 60
    assert parse_config("web", good(pubkey, stop_timeout="2min"), FILE).stop_timeout == 120


def test_sockets_and_network_parse(pubkey: Path) -> None:
    config = sockets_of(
        pubkey,
        [
            {"listen": 8080, "to": 80, "service": "nginx.service"},
            {"listen": "127.0.0.1:5353", "protocol": "udp", "native": "dns.socket"},
        ],
        {"mode": "veth", "address": "10.7.0.2/24"},
    )
    assert [str(listen) for _key, listen in config.listens()] == [
        "2222",
        "8080",
        "127.0.0.1:5353/udp",
    ]
    assert str(config.network.gateway) == "10.7.0.1/24"
    assert str(config.network) == "veth"
    again = parse_config("web", load_yaml(dump_config(config), FILE), FILE)
    assert again == config


@pytest.mark.parametrize(
    ("sockets", "key", "problem"),
    [
        ([{"listen": 8080}], "sockets[0].to", "is required"),
        ([{"listen": 8080, "to": 80}], "sockets[0].service", "is required"),
        ([{"listen": 8080, "to": 80, "service": "nginx"}], "sockets[0].service", "not a service"),
        ([{"listen": 8080, "native": "x.socket", "to": 1}], "sockets[0].native", "without"),
        ([{"listen": 8080, "native": "x.service"}], "sockets[0].native", "not a socket unit"),
        (
            [{"listen": 53, "protocol": "udp", "to": 53, "service": "d.service"}],
            "sockets[0].protocol",
            "cannot be proxied",
        ),
        (
            [{"listen": 8080, "protocol": "sctp", "native": "x.socket"}],
            "sockets[0].protocol",
            "not tcp or udp",
        ),
        ([{"listen": 2222, "native": "x.socket"}], "sockets[0].listen", "overlaps ssh.listen"),
        ([{"listen": 8080, "to": 70000, "service": "a.service"}], "sockets[0].to", "not a port"),
        (["8080"], "sockets[0]", "expected a mapping"),
        ([{"listen": 8080, "native": "x.socket", "lisen": 1}], "sockets[0].lisen", "unknown"),
    ],
)
def test_bad_sockets(pubkey: Path, sockets: Any, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        sockets_of(pubkey, sockets)
    assert (info.value.key, problem in info.value.message) == (key, True), info.value.message


@pytest.mark.parametrize(
    ("network", "key", "problem"),
    [
        ("wifi", "network", "not a network mode"),
        ("zone", "network", "not a network mode"),
        ("bridge:" + "b" * 13, "network", "not a bridge name"),
        ({"mode": "private", "address": "10.0.0.2/24"}, "network.address", "needs its own link"),
        ({"mode": "veth", "address": "10.0.0.2"}, "network.address", "/PREFIX"),
        ({"mode": "veth", "address": "10.0.0.0/24"}, "network.address", "host address"),
        ({"mode": "veth", "address": "10.0.0.1/24"}, "network.address", "host side"),
        ({"mode": "veth", "address": "fe80::1/64"}, "network.address", "IPv4"),
        ({"mode": "veth", "address": "10.0.0.2/24", "gw": 1}, "network.gw", "unknown key"),
    ],
)
def test_bad_network(pubkey: Path, network: Any, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        sockets_of(pubkey, [], network)
    assert (info.value.key, problem in info.value.message) == (key, True), info.value.message


def test_long_name_cannot_have_a_veth_address(pubkey: Path) -> None:
    with pytest.raises(ConfigError, match="longer than 15"):
        parse_config(
            "averylongname1", good(pubkey, network={"mode": "veth", "address": "10.0.0.2/24"}), FILE
        )


def test_address_used_by_another_container(pubkey: Path) -> None:
    net = {"mode": "zone:apps", "address": "10.0.0.2/24"}
    a = parse_config("a", good(pubkey, network=net), FILE)
    b = parse_config(
        "b", good(pubkey, network=net, ssh={"listen": 2200, "authorized_keys": [str(pubkey)]}), FILE
    )
    with pytest.raises(ConfigError, match="already the address of container 'a'"):
        check_conflicts(b, [a])
