"""screen.shown: guest text is shown as text, never as terminal controls."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nspawnctl.screen import shown

# What a terminal could act on, or what hides or reorders text around it.
HIDDEN = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def controls(text: str, keep: str = "\t") -> list[str]:
    return [c for c in text if c not in keep and unicodedata.category(c) in HIDDEN]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain line: 100% ok", "plain line: 100% ok"),
        ("", ""),
        ("caf\u00e9 \u4e2d\u6587", "caf\u00e9 \u4e2d\u6587"),  # printable non-ASCII stays
        ("a\tb", "a\tb"),  # a tab moves the cursor forward only
        ("\x1b[2K\rbeta: forged", "\\x1b[2K\\x0dbeta: forged"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("\x7f\x00\x08", "\\x7f\\x00\\x08"),
        ("\x9b31m", "\\x9b31m"),  # C1: 8-bit CSI
        ("\u202eevil\u2066", "\\u202eevil\\u2066"),  # bidi override, isolate
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("line\u2028sep", "line\\u2028sep"),
        ("tag\U000e0041", "tag\\U000e0041"),
        ("\udcff", "\\udcff"),  # a surrogate from an undecodable byte
        # A guest's own `\x1b` (four characters) is not the same as an escaped ESC.
        ("\\x1b", "\\\\x1b"),
        ("a\nb", "a\\x0ab"),
    ],
)
def test_shown(text: str, expected: str) -> None:
    assert shown(text) == expected


def test_newlines_kept_on_request() -> None:
    assert shown("a\nb\r\n", newlines=True) == "a\nb\\x0d\n"


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(st.text(alphabet=st.characters(codec=None)), st.booleans())
@example("\x1b\\\x9b\u202e\n\t", False)
def test_never_a_control_and_nothing_lost(text: str, newlines: bool) -> None:
    out = shown(text, newlines=newlines)
    assert controls(out, "\t\n" if newlines else "\t") == []
    # Nothing lost, nothing ambiguous: decoding the escapes gives the original back.
    assert _unescape(out) == text


def _unescape(text: str) -> str:
    """The inverse of shown(), for the test: \\\\, \\xHH, \\uHHHH, \\UHHHHHHHH."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "\\":
            out.append(text[i])
            i += 1
            continue
        kind = text[i + 1]
        if kind == "\\":
            out.append("\\")
            i += 2
            continue
        width = {"x": 2, "u": 4, "U": 8}[kind]
        out.append(chr(int(text[i + 2 : i + 2 + width], 16)))
        i += 2 + width
    return "".join(out)


def test_json_output_is_not_escaped_twice() -> None:
    # --json keeps the guest's text as it is: json.dumps escapes the controls itself,
    # and a reader of the JSON gets the original back.
    text = "\x1b[31mred\u202e"
    assert "\x1b" not in json.dumps(text)
    assert json.loads(json.dumps(text)) == text
