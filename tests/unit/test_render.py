from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nspawnctl.config import parse_config
from nspawnctl.install import verify_units
from nspawnctl.paths import Paths
from nspawnctl.reconcile import without_our_keys
from nspawnctl.render import GENERATED_MARK, MachineState, Rendering, render
from tests.unit.unitfile import single_values

MACHINE_ID = "0123456789abcdef0123456789abcdef"
UID_BASE = 0x00AB0000  # the guest's root on the host


def unit(text: str) -> dict[str, dict[str, str]]:
    return single_values(text)


def render_web(pubkey: Path) -> Rendering:
    ssh = {"listen": "127.0.0.1:2200", "authorized_keys": [str(pubkey)]}
    config = parse_config("web", {"hostname": "www", "ssh": ssh}, Path("/etc/nspawnctl/web.yaml"))
    state = MachineState(MACHINE_ID, Path("/var/lib/nspawnctl/images/debian-x/v3"), UID_BASE)
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
    # The YAML's keys: the host's file beside the layer, bound read-only into the guest.
    keys = next(f for f in rendering.host if f.path.name == "authorized_keys.root")
    assert keys.path.parent.parent.name == "web" and keys.path.parent.name == "ssh"
    assert pubkey.read_text().strip() in keys.text.splitlines()
    assert (keys.mode, keys.owner) == (0o600, UID_BASE)  # sshd's StrictModes: the guest's root
    service_conf = "/etc/systemd/system/systemd-nspawn@web.service.d/nspawnctl.conf"
    assert f"--bind-ro={keys.path.parent}:/etc/ssh/nspawnctl" in out[service_conf]
    assert "PasswordAuthentication no" in out[f"{root}/etc/ssh/sshd_config.d/nspawnctl.conf"]
    # An empty unit file is a masked unit: the image's own sshd must not start.
    assert out[f"{root}/etc/systemd/system/ssh.service"] == ""  # Debian's name
    assert out[f"{root}/etc/systemd/system/sshd.service"] == ""  # Fedora's
    service = unit(out[f"{root}/etc/systemd/system/sshd@.service"])
    assert service["Service"]["RuntimeDirectory"] == "sshd"


def test_service_drop_in_boots_this_machine(rendering: Rendering) -> None:
    out = files(rendering)
    drop_in = out["/etc/systemd/system/systemd-nspawn@web.service.d/nspawnctl.conf"]
    exec_start = [ln for ln in drop_in.splitlines() if ln.startswith("ExecStart=")]
    assert exec_start[0] == "ExecStart="  # resets the stock -U --network-veth line
    assert "--machine=web" in exec_start[1] and "--directory=/var/lib/machines/web" in exec_start[1]
    settings = unit(out["/etc/systemd/nspawn/web.nspawn"])
    assert settings["Exec"]["PrivateUsers"] == str(UID_BASE)
    assert settings["Files"]["PrivateUsersOwnership"] == "off"  # never chown the tree
    # The guest's systemd serves the passed sockets first, then goes on to the rest.
    assert settings["Exec"]["Parameters"] == "systemd.unit=nspawnctl-boot.target"
    assert settings["Network"]["Private"] == "yes"


def test_root_is_the_layer_over_one_image_version(rendering: Rendering) -> None:
    out = files(rendering)
    mount = unit(out["/etc/systemd/system/var-lib-machines-web.mount"])
    assert mount["Mount"]["Where"] == "/var/lib/machines/web"
    # The image version through the ID-mapped bind of the guest's uid range.
    lower = f"/run/nspawnctl/idmap/{UID_BASE}/var/lib/nspawnctl/images/debian-x/v3"
    assert mount["Mount"]["Options"] == (
        f"lowerdir={lower},"
        "upperdir=/var/lib/nspawnctl/layers/web/upper,workdir=/var/lib/nspawnctl/layers/web/work"
    )
    assert mount["Unit"]["StopWhenUnneeded"] == "yes"
    # Not while nspawnctl holds it stopped (the gate), and over its ID-mapped image.
    gate_then_lower = "nspawnctl-gate@web.service\nnspawnctl-lower@web.service"
    assert mount["Unit"]["Requires"] == mount["Unit"]["After"] == gate_then_lower
    drop_in = out["/etc/systemd/system/systemd-nspawn@web.service.d/nspawnctl.conf"]
    assert "Requires=var-lib-machines-web.mount" in drop_in
    idmap = unit(out["/etc/systemd/system/nspawnctl-lower@web.service"])
    assert idmap["Unit"]["ConditionPathIsMountPoint"] == f"!{lower}"  # once per boot
    command = idmap["Service"]["ExecStart"].split()
    assert command[-3:] == ["/var/lib/nspawnctl/images/debian-x/v3", lower, str(UID_BASE)]
    assert command[1:3] == ["-I", "-S"]  # a cheap Python start, see idmap.py


def test_without_a_user_namespace_the_guest_root_is_the_host_root(pubkey: Path) -> None:
    data = {"ssh": {"listen": 2222, "authorized_keys": [str(pubkey)]}}
    data["security"] = {"user_namespace": False, "drop_capabilities": ["net_raw"]}
    config = parse_config("web", data, Path("/etc/nspawnctl/web.yaml"))
    r = render(config, Paths.from_env({}), MachineState(MACHINE_ID, Path("/i/v1"), 0))
    out = files(r)
    settings = unit(out["/etc/systemd/nspawn/web.nspawn"])
    assert settings["Exec"]["PrivateUsers"] == "no"
    assert settings["Exec"]["DropCapability"] == "CAP_NET_RAW"
    mount = unit(out["/etc/systemd/system/var-lib-machines-web.mount"])
    assert mount["Mount"]["Options"].startswith("lowerdir=/i/v1,")
    assert mount["Unit"]["Requires"] == "nspawnctl-gate@web.service"  # the gate, no lower
    assert "/etc/systemd/system/nspawnctl-lower@web.service" not in out


def test_rendering_is_pure(rendering: Rendering, pubkey: Path) -> None:
    assert render_web(pubkey) == rendering


def test_systemd_accepts_the_host_units(rendering: Rendering) -> None:
    verify_units(rendering.host, ["nspawnctl-web.socket", "systemd-nspawn@web.service"])


def test_sockets_render_host_and_guest_from_one_value(pubkey: Path) -> None:
    data = {
        "ssh": {"listen": 2222, "authorized_keys": [str(pubkey)]},
        "sockets": [
            {"listen": "[::1]:8080", "to": 80, "service": "nginx.service"},
            {"listen": 5353, "protocol": "udp", "native": "dns.socket"},
        ],
        "network": {"mode": "zone:apps", "address": "10.8.0.5/24"},
    }
    config = parse_config("web", data, Path("/etc/nspawnctl/web.yaml"))
    r = render(config, Paths.from_env({}), MachineState(MACHINE_ID, Path("/i/v1"), UID_BASE))
    out = files(r)
    root = "/var/lib/machines/web"
    host = out["/etc/systemd/system/nspawnctl-web.socket"]
    assert "ListenStream=2222\nListenStream=[::1]:8080\nListenDatagram=5353\n" in host
    proxy = unit(out[f"{root}/etc/systemd/system/nspawnctl-proxy-0.socket"])
    assert proxy["Socket"]["ListenStream"] == "[::1]:8080"
    service = unit(out[f"{root}/etc/systemd/system/nspawnctl-proxy-0.service"])
    assert service["Unit"]["Requires"] == "nginx.service"
    assert service["Service"]["ExecStart"].endswith("systemd-socket-proxyd 127.0.0.1:80")
    native = out[f"{root}/etc/systemd/system/dns.socket.d/nspawnctl.conf"]
    assert "ListenStream=\nListenDatagram=5353\n" in native
    wants = out[f"{root}/etc/systemd/system/nspawnctl-sockets.target"]
    assert "Wants=nspawnctl-proxy-0.socket" in wants and "Wants=dns.socket" in wants
    assert "Zone=apps" in out["/etc/systemd/nspawn/web.nspawn"]
    assert unit(out["/etc/systemd/network/50-nspawnctl-web.network"])["Match"]["Name"] == "vz-apps"
    guest_net = unit(out[f"{root}/etc/systemd/network/50-nspawnctl.network"])
    assert (guest_net["Network"]["Address"], guest_net["Network"]["Gateway"]) == (
        "10.8.0.5/24",
        "10.8.0.1",
    )


def test_private_container_gets_no_network_files(rendering: Rendering) -> None:
    paths = {str(f.path) for f in rendering.host} | {str(f.path) for f in rendering.guest}
    assert not any("network" in p for p in paths)


def test_idle_check_counts_connections_of_native_sockets(pubkey: Path) -> None:
    def idle_script(sockets: list[dict[str, object]]) -> str:
        data = {
            "ssh": {"listen": 2222, "authorized_keys": [str(pubkey)]},
            "sockets": sockets,
            "idle_timeout": "20s",
        }
        config = parse_config("web", data, Path("/etc/nspawnctl/web.yaml"))
        r = render(config, Paths.from_env({}), MachineState(MACHINE_ID, Path("/i/v1"), UID_BASE))
        script = files(r)["/var/lib/machines/web/usr/local/libexec/nspawnctl-idle"]
        subprocess.run(["sh", "-n"], input=script, text=True, check=True)  # parses
        return script

    natives = idle_script(
        [{"listen": 2022, "native": "echo.socket"}, {"listen": 2023, "native": "dns.socket"}]
    )
    assert "--value \\\n            echo.socket dns.socket | grep -qv '^0$'\n}" in natives
    assert "--property=NConnections" not in idle_script([])


def test_an_old_authorized_keys_loses_only_what_nspawnctl_wrote() -> None:
    header = f"{GENERATED_MARK}/etc/nspawnctl/web.yaml; edit that file, not this one."
    ours, theirs = "ssh-ed25519 AAAAours yaml", "ssh-ed25519 AAAAtheirs copied"
    assert without_our_keys(f"{header}\n{ours}\n{theirs}\n", (ours,)) == f"{theirs}\n"
    assert without_our_keys(f"{header}\n{ours}\n", (ours,)) is None
