from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from nspawnctl.config import parse_config
from nspawnctl.install import verify_units
from nspawnctl.paths import Paths
from nspawnctl.render import GENERATED_MARK, MachineState, Rendering, render

MACHINE_ID = "0123456789abcdef0123456789abcdef"


def unit(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def render_web(pubkey: Path) -> Rendering:
    ssh = {"listen": "127.0.0.1:2200", "authorized_keys": [str(pubkey)]}
    config = parse_config("web", {"hostname": "www", "ssh": ssh}, Path("/etc/nspawnctl/web.yaml"))
    state = MachineState(MACHINE_ID, Path("/var/lib/nspawnctl/images/debian-x/v3"))
    return render(config, Paths.from_env({}), state)


@pytest.fixture
def rendering(pubkey: Path) -> Rendering:
    return render_web(pubkey)


def files(r: Rendering) -> dict[str, str]:
    return {str(f.path): f.text for f in r.all_files(Path("/var/lib/machines/web"))}


def test_host_and_guest_listen_on_the_same_address(rendering: Rendering) -> None:
    out = files(rendering)
    host = unit(out["/etc/systemd/system/nspawnctl-web.socket"])
    guest = unit(out["/var/lib/machines/web/etc/systemd/system/sshd.socket"])
    assert host["Socket"]["ListenStream"] == guest["Socket"]["ListenStream"] == "127.0.0.1:2200"
    assert host["Socket"]["Service"] == "systemd-nspawn@web.service"
    assert guest["Socket"]["Accept"] == "yes"


def test_every_generated_unit_names_its_source(rendering: Rendering) -> None:
    for f in rendering.host:
        assert f.text.startswith(GENERATED_MARK + "/etc/nspawnctl/web.yaml")


def test_guest_identity_and_access(rendering: Rendering, pubkey: Path) -> None:
    out = files(rendering)
    root = "/var/lib/machines/web"
    assert out[f"{root}/etc/hostname"] == "www\n"
    assert out[f"{root}/etc/machine-id"] == MACHINE_ID + "\n"
    assert pubkey.read_text().strip() in out[f"{root}/root/.ssh/authorized_keys"].splitlines()
    assert "PasswordAuthentication no" in out[f"{root}/etc/ssh/sshd_config.d/nspawnctl.conf"]
    # An empty unit file is a masked unit: the image's own sshd must not start.
    assert out[f"{root}/etc/systemd/system/ssh.service"] == ""  # Debian's name
    assert out[f"{root}/etc/systemd/system/sshd.service"] == ""  # Fedora's
    service = unit(out[f"{root}/etc/systemd/system/sshd@.service"])
    assert service["Service"]["RuntimeDirectory"] == "sshd"
    modes = {str(f.path): f.mode for f in rendering.guest}
    assert modes["root/.ssh/authorized_keys"] == 0o600


def test_service_drop_in_boots_this_machine(rendering: Rendering) -> None:
    out = files(rendering)
    drop_in = out["/etc/systemd/system/systemd-nspawn@web.service.d/nspawnctl.conf"]
    exec_start = [ln for ln in drop_in.splitlines() if ln.startswith("ExecStart=")]
    assert exec_start[0] == "ExecStart="  # resets the stock -U --network-veth line
    assert "--machine=web" in exec_start[1] and "--directory=/var/lib/machines/web" in exec_start[1]
    settings = unit(out["/etc/systemd/nspawn/web.nspawn"])
    assert settings["Exec"]["PrivateUsers"] == "no"
    assert settings["Network"]["Private"] == "yes"


def test_root_is_the_layer_over_one_image_version(rendering: Rendering) -> None:
    out = files(rendering)
    mount = unit(out["/etc/systemd/system/var-lib-machines-web.mount"])
    assert mount["Mount"]["Where"] == "/var/lib/machines/web"
    assert mount["Mount"]["Options"] == (
        "lowerdir=/var/lib/nspawnctl/images/debian-x/v3,"
        "upperdir=/var/lib/nspawnctl/layers/web/upper,workdir=/var/lib/nspawnctl/layers/web/work"
    )
    assert mount["Unit"]["StopWhenUnneeded"] == "yes"
    drop_in = out["/etc/systemd/system/systemd-nspawn@web.service.d/nspawnctl.conf"]
    assert "Requires=var-lib-machines-web.mount" in drop_in


def test_rendering_is_pure(rendering: Rendering, pubkey: Path) -> None:
    assert render_web(pubkey) == rendering


def test_systemd_accepts_the_host_units(rendering: Rendering) -> None:
    verify_units(rendering.host, ["nspawnctl-web.socket", "systemd-nspawn@web.service"])
