"""The test agent that runs inside the VM (tests/vm/vmhost.py installs it as a unit).

It reads requests from a virtio-serial port, one JSON object per line:
    {"id": 7, "argv": ["systemctl", "is-system-running"], "input": null, "timeout": 60}
runs each command, one at a time, and writes back one JSON line:
    {"id": 7, "rc": 0, "stdout": "running\\n", "stderr": ""}
or {"id": 7, "rc": null, ...} when the command outlived its timeout and was killed.

Only the standard library: it runs under the VM's own /usr/bin/python3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def execute(request: dict[str, Any]) -> dict[str, Any]:
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", **request.get("env", {})}
    data = request.get("input")
    try:
        # A session of its own: a timeout kills the command's whole process group, so
        # nothing it started holds the pipes open.
        proc = subprocess.Popen(
            request["argv"],
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/root",
            start_new_session=True,
        )
    except OSError as e:  # no such program: report it like a shell would
        return {"rc": 127, "stdout": "", "stderr": f"{request['argv'][0]}: {e}\n"}
    try:
        out, err = proc.communicate(
            data.encode() if data is not None else None, timeout=request["timeout"]
        )
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out, err, rc = b"", b"", None
    return {
        "rc": rc,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
    }


def main() -> int:
    port = os.open(sys.argv[1], os.O_RDWR)
    pending = b""
    while True:
        chunk = os.read(port, 65536)
        if not chunk:
            # The host end is not connected (yet, or any more): exit, and let the unit's
            # Restart= open the port again, rather than spin on end-of-file.
            return 1
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            reply = {"id": request["id"], **execute(request)}
            data = json.dumps(reply).encode() + b"\n"
            while data:
                data = data[os.write(port, data) :]


if __name__ == "__main__":
    sys.exit(main())
