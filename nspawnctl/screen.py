"""Guest text shown on the admin's terminal as text, never as terminal controls.

A guest's root decides what its commands print and what its processes are called. Raw,
an ESC or CSI sequence in such text acts on the terminal that shows it: it moves the
cursor back over the `NAME: ` prefix, forges another container's line or nspawnctl's
own summary, sets the window title, or makes the terminal answer with bytes that reach
the admin's shell as if typed. `shown()` renders every control character visibly
instead, and escapes the backslash too, so a guest that prints the four characters
`\\x1b` cannot pass them off as an escape nspawnctl made.

For human output only: `--json` goes through json.dumps, which escapes controls itself.
"""

from __future__ import annotations

import re
import unicodedata

# Besides C0, DEL and C1: characters that change how the text around them is displayed,
# though they are not terminal controls. Bidi overrides and isolates reorder a line (the
# "Trojan Source" trick: `beta: ok` that reads as something else); zero-width and other
# format characters hide text or forge look-alike names. Unicode category Cf holds them
# all; Zl/Zp (U+2028, U+2029) break lines in some terminals; surrogates (Cs) are not
# text at all (they come from undecodable bytes with errors="surrogateescape").
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _needs_escape(char: str, keep: str) -> bool:
    return char not in keep and (char == "\\" or unicodedata.category(char) in _HIDDEN_CATEGORIES)


# Fast path: most lines are plain ASCII without a backslash.
_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]*")


def shown(text: str, *, newlines: bool = False) -> str:
    """`text` with each control, format and line-separator character written as a
    visible escape (`\\x1b`, `\\u202e`) and each backslash doubled. Tabs are kept,
    and with `newlines` line feeds too (for a caller that prints several lines and
    prefixes none of them). Pure; the result holds no other control character."""
    if _PLAIN.fullmatch(text):
        return text
    keep = "\t\n" if newlines else "\t"
    return "".join(_escape(c) if _needs_escape(c, keep) else c for c in text)
