#!/usr/bin/python
"""An Ansible module: an image in nspawnctl's store on the managed host."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nspawnctl_image
short_description: An image in nspawnctl's store (the read-only root containers are layers over)
description:
  - Makes sure the image C(name) is in the managed host's nspawnctl store
    (C(nspawnctl image build)), or that it is not (C(nspawnctl image remove)).
  - An image is bootstrapped once; later runs find it and change nothing.
version_added: "0.2.0"
options:
  name:
    description: The image as a container's YAML names it (C(debian:bookworm)), or its key.
    type: str
    required: true
  state:
    description: C(present) built if missing; C(absent) removed (refused while a container uses it).
    type: str
    choices: [present, absent]
    default: present
  nspawnctl:
    description: The nspawnctl program on the managed host.
    type: str
    default: nspawnctl
author: nspawnctl developers
"""

EXAMPLES = r"""
- name: The image every container of the fleet sits on, bootstrapped before they are added
  nspawnctl.fleet.nspawnctl_image: {name: "debian:bookworm"}
"""

RETURN = r"""
key:
  description: The image's key in the store.
  returned: when present
  type: str
version:
  description: Its current version (v1, v2...).
  returned: when present
  type: str
"""

import json

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "nspawnctl": {"type": "str", "default": "nspawnctl"},
        },
        supports_check_mode=True,
    )
    program, name = module.params["nspawnctl"], module.params["name"]

    def run(*args: str) -> str:
        rc, out, err = module.run_command([program, *args])
        if rc != 0:
            message = "\n".join(line for line in err.splitlines() if line.strip()) or out
            module.fail_json(msg=message, rc=rc, cmd=[program, *args])
        return out

    def found() -> list[dict]:
        return [
            i for i in json.loads(run("image", "list", "--json")) if name in (i["image"], i["key"])
        ]

    images = found()
    result: dict = {"changed": False}
    if module.params["state"] == "present" and not images:
        result["changed"] = True
        if not module.check_mode:
            run("image", "build", name)
            images = found()
    elif module.params["state"] == "absent" and images:
        result["changed"] = True
        if not module.check_mode:
            run("image", "remove", "--all", name)
            images = []
    if images:
        result.update(key=images[0]["key"], version=images[0]["version"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
