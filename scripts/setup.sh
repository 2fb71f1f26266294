#!/usr/bin/env bash
# Install everything nspawnctl and its tests need on a fresh Debian 12 machine (as root).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    systemd-container     # systemd-nspawn, machinectl, systemd-machined
    debootstrap           # bootstraps Debian and Ubuntu images
    dnf rpm createrepo-c  # bootstraps Fedora-family images; the tests build a local repo
    zstd xz-utils         # tar imports of .tar.zst and .tar.xz archives
    libsystemd-dev pkg-config gcc   # pystemd builds against libsystemd
    openssh-client        # ssh-keygen for guest host keys; ssh for the tests
    rsync                 # the tests copy files to and from a guest, as users do
    iproute2              # ss, for the tests
    tmux                  # the tests drive `nspawnctl top` on a terminal
    groff-base man-db     # the man page test renders the pages
    qemu-system-x86 linux-image-cloud-amd64   # the VM tests boot a whole VM host (tests/vm)
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
