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
    openssh-client        # ssh-keygen for guest host keys; ssh for -H and the tests
    openssh-server        # sshd in the throw-away hosts of the multi-host tests
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
    # What is installed here must not start here (sshd on this machine's port 22): the
    # tests start it inside their own hosts. policy-rc.d(8) tells the packages so.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
