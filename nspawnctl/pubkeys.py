"""OpenSSH public keys as the YAML gives them: a key line, or the path of a file of them.
A file named here may be anything on the host: its text is never echoed."""

from __future__ import annotations

import re
from pathlib import Path

KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_KEY_RE = re.compile(
    r"(?:^|\s)(?:" + "|".join(map(re.escape, KEY_TYPES)) + r")\s+[A-Za-z0-9+/]{16,}={0,3}(?:\s|$)"
)
# A key line goes into the guest's authorized_keys as it is: one line, no escapes.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def read_public_keys(entry: str, *, base: Path) -> list[str]:
    """A key line as it is, or the key lines of a file; ValueError if there is no key."""
    entry = entry.strip()
    if _KEY_RE.search(entry):
        if _CONTROL_RE.search(entry):
            raise ValueError("a key must be a single line of printable text")
        return [entry]
    try:
        path = (base / Path(entry).expanduser()) if entry else base
        # A device or a FIFO (/dev/zero, /dev/stdin) could be read forever.
        if path.exists() and not path.is_file():
            raise ValueError(f"{entry!r} is neither a public key nor a regular file")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, RuntimeError) as err:
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
        elif isinstance(err, RuntimeError):  # from expanduser(): ~nosuchuser/key.pub
            reason = "no such user"
        else:
            reason = "not a text file"
        raise ValueError(
            f"{entry!r} is neither a public key nor a readable file ({reason})"
        ) from None
    numbered = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    numbered = [(n, ln) for n, ln in numbered if ln and not ln.startswith("#")]
    lines = [ln for _n, ln in numbered]
    bad = [n for n, ln in numbered if not _KEY_RE.search(ln) or _CONTROL_RE.search(ln)]
    if bad or not lines:
        raise ValueError(
            f"{str(path)!r} holds no public key (is it the private key?)"
            if not lines or "PRIVATE KEY" in text
            # Which line, never what it says: the file may be a secret (/etc/shadow).
            else f"{str(path)!r}: line {bad[0]} is not a public key"
        )
    return lines
