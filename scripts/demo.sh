#!/usr/bin/env bash
# Set everything up, then show the main job: a container added, reached over SSH
# through socket activation, its journal shown merged with the host's.
#
# It runs inside a throw-away systemd host (an nspawn container booted on a volatile
# overlay of this machine's root, tests/testhost.py), so it works where PID 1 is not
# systemd, and on a systemd host it leaves the real /etc/systemd/system alone.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cache=/var/cache/nspawnctl-test   # shared with the tests: one debootstrap, ever
echo "== bootstrapping debian:bookworm into $cache (about a minute, once)"
NSPAWNCTL_STATE_DIR=$cache python3 -m nspawnctl image build debian:bookworm
echo "== booting a throw-away systemd host"
# Container layers need a real file system under them: the throw-away host's own
# root is an overlay, and overlayfs cannot be the upper layer of another overlay.
layers=$(mktemp -d /var/tmp/nspawnctl-demo-layers.XXXXXX)
trap 'rm -rf "$layers"' EXIT
python3 -m tests.testhost --bind "$cache/images:/var/lib/nspawnctl/images" \
    --bind "$layers:/var/lib/nspawnctl/layers" -- bash "$PWD/scripts/demo-inside.sh"
