#!/usr/bin/python
"""An Ansible module: one nspawnctl container on the managed host, driven through the
nspawnctl there (its `apply --dry-run` says whether anything would change)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nspawnctl_container
short_description: A socket-activated systemd-nspawn container, made by nspawnctl
description:
  - Makes the container C(name) on the managed host match its nspawnctl YAML, through
    that host's C(nspawnctl) (the same MAJOR.MINOR as this collection).
  - A new container is added and its socket listens; a changed one is applied as
    C(nspawnctl apply) does (re-rendered, restarted only if it runs and must).
  - Check mode and C(--diff) use C(nspawnctl apply --dry-run); a second run with the
    same YAML changes nothing.
version_added: "0.2.0"
options:
  name:
    description: The container's name (its YAML is CONFIG_DIR/NAME.yaml).
    type: str
    required: true
  state:
    description:
      - C(present) the container exists and its socket listens (it boots on the first
        connection); C(started) it is booted now; C(stopped) it is powered off, its
        socket still listening; C(absent) it is removed with its layer.
    type: str
    choices: [present, started, stopped, absent]
    default: present
  config:
    description:
      - The YAML as a mapping (see nspawnctl.yaml(5)). It is written as JSON, which is
        YAML too, so that no YAML library is needed on the managed host.
      - Mutually exclusive with I(src).
    type: dict
  src:
    description: The path of a YAML file on the managed host.
    type: path
  nspawnctl:
    description: The nspawnctl program on the managed host.
    type: str
    default: nspawnctl
notes:
  - Needs root on the managed host (C(become)).
  - Errors carry nspawnctl's own message and hint.
author: nspawnctl developers
"""

EXAMPLES = r"""
- name: A web container whose socket boots it on the first connection
  nspawnctl.fleet.nspawnctl_container:
    name: web
    config:
      image: debian:bookworm
      ssh: {listen: 2222, authorized_keys: ["ssh-ed25519 AAAA... admin"]}

- name: Every YAML file of a directory on the controller, one container each
  nspawnctl.fleet.nspawnctl_container:
    name: "{{ item | basename | splitext | first }}"
    config: "{{ lookup('file', item) | from_yaml }}"
  loop: "{{ query('fileglob', 'fleet/*.yaml') }}"

- name: Gone, with its layer
  nspawnctl.fleet.nspawnctl_container: {name: old, state: absent}
"""

RETURN = r"""
plan:
  description: What C(nspawnctl apply --dry-run) said it would do.
  returned: when the container is present
  type: str
state:
  description: The container's state afterwards (running, stopped...), as C(nspawnctl status) says.
  returned: unless absent
  type: str
"""

import json
import os
import re
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule


class Nspawnctl:
    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.program = module.params["nspawnctl"]

    def run(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        rc, out, err = self.module.run_command([self.program, *args])
        if check and rc != 0:
            # nspawnctl's own words: "nspawnctl: error: ..." and its hint.
            message = "\n".join(line for line in err.splitlines() if line.strip()) or out
            self.module.fail_json(msg=message, rc=rc, cmd=[self.program, *args])
        return rc, out, err

    def status(self, name: str) -> dict | None:
        # `list` exits 1 when another container's YAML there is broken: its rows still
        # count (this task may be the one that mends it).
        _rc, out, _err = self.run("list", "--json", check=False)
        try:
            rows = json.loads(out or "[]")
        except ValueError:
            self.run("list", "--json")  # fails with nspawnctl's own message
            raise

        if name not in {row["name"] for row in rows}:
            return None
        return json.loads(self.run("status", name, "--json")[1])


def _config_text(module: AnsibleModule) -> str:
    if module.params["src"] is not None:
        try:
            with open(module.params["src"], encoding="utf-8") as f:
                return f.read()
        except OSError as err:
            module.fail_json(msg=f"{module.params['src']}: {err.strerror}")
    return json.dumps(module.params["config"], indent=2, sort_keys=True) + "\n"


def _changes(plan: str, name: str) -> bool:
    """Whether `apply --dry-run` would add or change the container."""
    return re.search(rf"^[+~] {re.escape(name)}:", plan, re.MULTILINE) is not None


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "state": {
                "type": "str",
                "default": "present",
                "choices": ["present", "started", "stopped", "absent"],
            },
            "config": {"type": "dict"},
            "src": {"type": "path"},
            "nspawnctl": {"type": "str", "default": "nspawnctl"},
        },
        mutually_exclusive=[("config", "src")],
        required_if=[("state", "present", ("config", "src"), True)],
        supports_check_mode=True,
    )
    name, state = module.params["name"], module.params["state"]
    tool = Nspawnctl(module)
    status = tool.status(name)
    result: dict = {"changed": False}

    if state == "absent":
        if status is not None:
            result["changed"] = True
            result["diff"] = {"before": f"{name}: installed\n", "after": ""}
            if not module.check_mode:
                tool.run("remove", name)
        module.exit_json(**result)

    if module.params["config"] is not None or module.params["src"] is not None:
        wanted = _config_text(module)
        before = ""
        if status is not None and os.path.isfile(status["config"]):
            with open(status["config"], encoding="utf-8") as f:
                before = f.read()
        directory = tempfile.mkdtemp(prefix="nspawnctl-ansible-")
        try:
            path = os.path.join(directory, f"{name}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(wanted)
            plan = tool.run("apply", "--dry-run", directory)[1]
            result["plan"] = plan
            if _changes(plan, name):
                result["changed"] = True
                result["diff"] = {
                    "before": before,
                    "after": wanted,
                    "before_header": status["config"] if status else f"{name} (none)",
                    "after_header": f"{name}.yaml",
                }
                if not module.check_mode:
                    tool.run("apply", directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    elif status is None:
        module.fail_json(msg=f"{name} is not installed: give config or src")

    if state in ("started", "stopped"):
        status = tool.status(name) if not module.check_mode else status
        running = bool(status) and status["container"]["state"] == "running"
        if (state == "started") != running:
            result["changed"] = True
            if not module.check_mode:
                tool.run("start" if state == "started" else "stop", name)
    if not module.check_mode:
        status = tool.status(name)
    if status is not None:
        result["state"] = status["container"]["state"]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
