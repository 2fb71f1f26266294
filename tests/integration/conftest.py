"""Integration tests: a throw-away systemd host (tests/testhost.py) with real nested
containers, real sshd, real journal. The bootstrapped image is cached on this machine
between runs, because the test host has no network of its own."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nspawnctl.config import ImageRef
from nspawnctl.store import ImageStore, recipe_for
from tests.testhost import Bind, TestHost

# Keyed by recipe inside, so a changed recipe is a new image, never a stale one.
IMAGE_CACHE = Path(os.environ.get("NSPAWNCTL_TEST_IMAGE_CACHE", "/var/cache/nspawnctl-test/images"))
STORE_IN_HOST = "/var/lib/nspawnctl/images"
CLIENT_KEY = "/root/.ssh/id_ed25519"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def image_cache() -> Path:
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("integration tests need root and systemd-nspawn (see README.md)")
    ImageStore(IMAGE_CACHE).ensure(recipe_for(ImageRef("debian", "bookworm")))
    return IMAGE_CACHE


@pytest.fixture(scope="module")
def host(image_cache: Path) -> Iterator[TestHost]:
    with TestHost(binds=[Bind(image_cache, STORE_IN_HOST)]) as h:
        h.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", CLIENT_KEY])
        yield h


def nspawnctl(host: TestHost, *args: str, check: bool = True) -> CompletedProcess[str]:
    return host.run([sys.executable, "-m", "nspawnctl", *args], check=check)


def ssh(host: TestHost, port: int, command: str, *, check: bool = True) -> CompletedProcess[str]:
    """A real OpenSSH client connecting to the test host's port."""
    return host.run(
        [
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
        ],
        check=check,
        timeout=120,
    )


from subprocess import CompletedProcess  # noqa: E402  (for the annotations above)
