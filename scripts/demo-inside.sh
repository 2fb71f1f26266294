#!/usr/bin/env bash
# The demo itself, run inside the throw-away systemd host by scripts/demo.sh.
set -euo pipefail
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/id_ed25519
ssh_opts=(-p 2222 -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/root/.ssh/known_hosts)

step nspawnctl add web --ssh 2222 --key /root/.ssh/id_ed25519.pub
step nspawnctl list
echo "(the socket listens; no container runs yet:)"
step machinectl list --no-pager
step ssh "${ssh_opts[@]}" root@127.0.0.1 \
    'echo "hello from $(hostname), PID 1 is $(cat /proc/1/comm)"'
step machinectl list --no-pager
step nspawnctl stop web
step nspawnctl status web
step ssh "${ssh_opts[@]}" root@127.0.0.1 'logger -t demo "a line from inside the container"'
echo "(the guest's journal merged with the host's: host lines say testhost, guest lines web)"
nspawnctl logs --all -n 400 | grep -E ' (web|testhost) ' | grep -E 'sshd|demo|Container web|nspawnctl-web' | tail -n 12
step nspawnctl remove web
