"""Integration tests: a throw-away systemd host (tests/testhost.py) with real nested
containers, real sshd, real journal. The bootstrapped image is cached on this machine
between runs, because the test host has no network of its own."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from nspawnctl.bootstrap.debootstrap import BASE_PACKAGES
from nspawnctl.recipe import Recipe, parse_image
from nspawnctl.store import Image, ImageStore
from tests.testhost import DEFAULT_MASK, Bind, TestHost

# Keyed by recipe inside, so a changed recipe is a new image; one that an older
# nspawnctl built without what this one puts in every image is built again (fresh()).
IMAGE_CACHE = Path(os.environ.get("NSPAWNCTL_TEST_IMAGE_CACHE", "/var/cache/nspawnctl-test/images"))
STATE_IN_HOST = "/var/lib/nspawnctl"
STORE_IN_HOST = f"{STATE_IN_HOST}/images"
CLIENT_KEY = "/root/.ssh/id_ed25519"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


def cached_image() -> Image:
    """debian:bookworm, bootstrapped on this machine once (the test host has no network)."""
    return fresh(ImageStore(IMAGE_CACHE), parse_image("debian:bookworm"))


def fresh(store: ImageStore, recipe: Recipe) -> Image:
    """The store's image of a debootstrap `recipe`, built again if it lacks a package
    that nspawnctl now puts in every image (the tests count on them)."""
    # Test modules run in parallel workers (pytest-xdist): one of them must not remove an
    # image that another has just found. Not the store's own lock: ensure() takes that.
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root.parent / f".{store.root.name}.fresh.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        image = store.find(recipe)
        if image is not None and not set(BASE_PACKAGES) <= _dpkg_installed(image.current):
            subprocess.run(["rm", "-rf", "--one-file-system", "--", image.path], check=True)
        return store.ensure(recipe)


def _dpkg_installed(root: Path) -> set[str]:
    try:
        status = (root / "var/lib/dpkg/status").read_text()
    except FileNotFoundError:
        return set()
    names = set()
    for block in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if fields.get("Status") == "install ok installed":
            names.add(fields.get("Package", ""))
    return names


@pytest.fixture(scope="session")
def image_cache() -> Path:
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("integration tests need root and systemd-nspawn (see README.md)")
    cached_image()
    return IMAGE_CACHE


@pytest.fixture(scope="module")
def private_store(image_cache: Path) -> Iterator[Path]:
    """A private copy of the cached store, for tests that update or import images."""
    with tempfile.TemporaryDirectory(prefix="nspawnctl-store-", dir="/var/tmp") as tmp:
        image = cached_image()
        shutil.copytree(image.path, Path(tmp) / image.key, symlinks=True, copy_function=_copy)
        yield Path(tmp)


def _copy(src: str, dst: str) -> None:
    shutil.copy2(src, dst, follow_symlinks=False)


@contextlib.contextmanager
def booted_host(images: Path, mask: Sequence[str] = DEFAULT_MASK) -> Iterator[TestHost]:
    """A test host whose image store is `images` and whose container layers, and the
    snapshots of them, live on a real file system of this machine: overlayfs cannot use
    the host's own overlay root as an upper layer, nor hold a layer's whiteouts."""
    state = tempfile.mkdtemp(prefix="nspawnctl-state-", dir="/var/tmp")
    try:
        binds = [Bind(images, STORE_IN_HOST)]
        for sub in ("layers", "snapshots"):
            (Path(state) / sub).mkdir()
            binds.append(Bind(Path(state) / sub, f"{STATE_IN_HOST}/{sub}"))
        with TestHost(binds=binds, mask=mask) as host:
            host.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", CLIENT_KEY])
            yield host
    finally:
        # rm, not shutil.rmtree: a hostile guest's tree may be deeper than Python recurses.
        subprocess.run(["rm", "-rf", "--one-file-system", "--", state], check=False)


@pytest.fixture(scope="module")
def host(image_cache: Path) -> Iterator[TestHost]:
    with booted_host(image_cache) as h:
        yield h


@contextlib.contextmanager
def squatter(host: TestHost, family: str, address: str, port: int) -> Iterator[None]:
    """A program of the host (not a container) listening on address:port meanwhile."""
    host.run(
        [
            "systemd-run",
            "--unit=squatter",
            "python3",
            "-c",
            f"import socket, signal; s = socket.socket(socket.{family}); "
            f"s.bind(({address!r}, {port})); s.listen(); signal.pause()",
        ]
    )
    try:
        host.wait_for(
            lambda: f":{port}" in host.run(["ss", "-Htln"]).stdout,
            timeout=30,
            what="squatter listening",
        )
        yield
    finally:
        host.run(["systemctl", "stop", "squatter"])


def nspawnctl(
    host: TestHost,
    *args: str,
    check: bool = True,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> CompletedProcess[str]:
    argv = [sys.executable, "-m", "nspawnctl", *args]
    return host.run(argv, check=check, timeout=timeout, env=env)


def ssh_argv(port: int, command: str) -> list[str]:
    """A real OpenSSH client's command line, connecting to the test host's port."""
    return [
        "ssh",
        "-p",
        str(port),
        "-i",
        CLIENT_KEY,
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=60",
        "-o",
        "LogLevel=ERROR",
        "root@127.0.0.1",
        command,
    ]


def ssh(host: TestHost, port: int, command: str, *, check: bool = True) -> CompletedProcess[str]:
    """A real OpenSSH client connecting to the test host's port."""
    return host.run(ssh_argv(port, command), check=check, timeout=120)
