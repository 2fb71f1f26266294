"""The man pages describe what the code does: every verb, option, environment variable
and YAML key that the code knows is documented, and the pages render without warnings.

The lists come from the code (the argument parser, `paths.environment_variables()`,
`config.KNOWN_KEYS`), never from a copy kept here, so a new option or key without
documentation fails this test."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nspawnctl import cli, config, paths, pubkeys, ssh
from nspawnctl.metrics import FAMILIES
from nspawnctl.schema import dotted_keys

MAN_DIR = Path(__file__).resolve().parents[2] / "man"
PAGE_1 = MAN_DIR / "nspawnctl.1"
PAGE_5 = MAN_DIR / "nspawnctl.yaml.5"

# --- reading roff -------------------------------------------------------------------

# Escapes the pages use, and what they print as.
_ESCAPES = {r"\-": "-", r"\(aq": "'", r"\(dq": '"', r"\(ti": "~", r"\(ha": "^", r"\e": "\\"}
_ESCAPE_RE = re.compile("|".join(re.escape(e) for e in _ESCAPES))
# Font changes and zero-width escapes print nothing.
_SILENT_RE = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)|\\[&%c]")
# Macros whose arguments are printed: .B/.I as words, the alternating ones run together.
_WORD_MACROS = {"B", "I", "SM", "SB"}
_ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}


def plain(roff: str) -> str:
    """The text of roff source as it prints (near enough to search in)."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], _SILENT_RE.sub("", roff))


def _arguments(text: str) -> list[str]:
    """Macro arguments: separated by blanks, "double quoted" ones may hold blanks."""
    return [q if q else w for q, w in re.findall(r'"([^"]*)"|(\S+)', text)]


def text_line(line: str) -> str | None:
    """The printed text of one source line; None for a request without text."""
    if not line.startswith((".", "'")):
        return plain(line)
    macro, _, rest = line[1:].partition(" ")
    if macro in _WORD_MACROS:
        return plain(" ".join(_arguments(rest)))
    if macro in _ALTERNATING_MACROS:
        return plain("".join(_arguments(rest)))
    return None


def sections(page: Path) -> dict[str, list[str]]:
    """Source lines of each .SH section, by the section's title; comments removed."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith('.\\"'):
            continue
        if line.startswith(".SH "):
            current = found.setdefault(" ".join(_arguments(line[4:])), [])
        else:
            current.append(line)
    return found


def section(page: Path, title: str) -> list[str]:
    found = sections(page)
    assert title in found, f"{page.name} has no section {title} (it has {sorted(found)})"
    return found[title]


def entries(lines: list[str]) -> Iterator[tuple[list[str], str]]:
    """The top-level .TP entries of a section: their heading lines (a .TP heading and
    any .TQ headings after it) as printed text, and the printed text of the whole entry,
    nested .RS/.RE paragraphs included."""
    headings: list[str] = []
    body: list[str] = []
    depth = 0
    expect_heading = False
    for line in lines:
        if line.startswith(".RS"):
            depth += 1
        elif line.startswith(".RE"):
            depth -= 1
        elif depth == 0 and line.startswith(".TP"):
            if headings:
                yield headings, "\n".join(body)
            headings, body, expect_heading = [], [], True
            continue
        elif depth == 0 and line.startswith(".TQ"):
            expect_heading = True
            continue
        elif depth == 0 and line.split(" ")[0] in (".PP", ".P", ".LP"):
            if headings:  # a new paragraph of the section, no longer of the entry
                yield headings, "\n".join(body)
            headings, body = [], []
            continue
        text = text_line(line)
        if text is None:
            continue
        if expect_heading:
            headings.append(text)
            expect_heading = False
        body.append(text)
    if headings:
        yield headings, "\n".join(body)


def entries_by_first_word(page: Path, title: str) -> dict[str, str]:
    """Each entry's text, under the first word of each of its headings; the entries of
    headings with the same first word (`image build`, `image list`) run together."""
    found: dict[str, str] = {}
    for headings, body in entries(section(page, title)):
        for word in dict.fromkeys(first_words(headings, page, title)):
            found[word] = f"{found[word]}\n{body}" if word in found else body
    return found


def first_words(headings: list[str], page: Path, title: str) -> Iterator[str]:
    for heading in headings:
        words = heading.split()
        assert words, f"{page.name}: an empty .TP heading in {title}"
        yield words[0]


def command_headings(page: Path) -> set[tuple[str, ...]]:
    """The words of every heading under COMMANDS."""
    return {
        tuple(heading.split())
        for headings, _body in entries(section(page, "COMMANDS"))
        for heading in headings
    }


def mentions(text: str, word: str) -> bool:
    """Whether `word` (an option, a key, a variable) stands in `text` as a whole word."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# --- what the code knows ------------------------------------------------------------


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every verb and sub-verb (`image build`) with its parser."""
    for verb, sub in subparsers(parser).items():
        yield (*path, verb), sub
        yield from commands(sub, (*path, verb))


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [
        option
        for action in parser._actions
        for option in action.option_strings
        # Hidden: one side of nspawnctl talking to the other (-H's --client-files).
        if option not in ("-h", "--help") and action.help != argparse.SUPPRESS
    ]


COMMANDS = dict(commands(cli.build_parser()))
SUB_VERBS = [" ".join(path) for path in COMMANDS if len(path) > 1]
VERB_OPTIONS = [(" ".join(path), o) for path, p in COMMANDS.items() for o in options(p)]


# --- nspawnctl(1) -------------------------------------------------------------------


def test_the_verbs_are_the_parsers() -> None:
    # The documentation test relies on this, so check it here too.
    assert cli.verbs() == sorted(subparsers(cli.build_parser()))


@pytest.mark.parametrize("verb", cli.verbs())
def test_every_verb_has_an_entry(verb: str) -> None:
    assert verb in entries_by_first_word(PAGE_1, "COMMANDS"), (
        f"nspawnctl.1: no entry `.TP` + `\\fB{verb}\\fR ...` under COMMANDS"
    )


def test_no_entry_for_a_verb_that_does_not_exist() -> None:
    documented = set(entries_by_first_word(PAGE_1, "COMMANDS"))
    assert documented <= set(cli.verbs()), f"stale: {sorted(documented - set(cli.verbs()))}"


@pytest.mark.parametrize("sub_verb", SUB_VERBS)
def test_every_sub_verb_has_an_entry(sub_verb: str) -> None:
    words = tuple(sub_verb.split())
    assert any(h[: len(words)] == words for h in command_headings(PAGE_1)), (
        f"nspawnctl.1: no entry `.TP` + `\\fB{sub_verb}\\fR ...` under COMMANDS"
    )


@pytest.mark.parametrize(("command", "option"), VERB_OPTIONS)
def test_every_option_is_in_its_verbs_entry(command: str, option: str) -> None:
    entry = entries_by_first_word(PAGE_1, "COMMANDS").get(command.partition(" ")[0], "")
    assert mentions(entry, option), f"nspawnctl.1: {option} is not in the entry of {command}"


@pytest.mark.parametrize("option", options(cli.build_parser()))
def test_every_global_option_is_under_options(option: str) -> None:
    text = "\n".join(filter(None, map(text_line, section(PAGE_1, "OPTIONS"))))
    assert mentions(text, option), f"nspawnctl.1: {option} is not under OPTIONS"


# Besides the locations: the far program of -H.
VARIABLES = {**paths.environment_variables(), ssh.REMOTE_COMMAND_VARIABLE: "nspawnctl"}


@pytest.mark.parametrize(("variable", "default"), VARIABLES.items())
def test_every_variable_has_an_entry_with_its_default(variable: str, default: str) -> None:
    found = entries_by_first_word(PAGE_1, "ENVIRONMENT")
    assert variable in found, f"nspawnctl.1: no entry for {variable} under ENVIRONMENT"
    assert default in found[variable], f"nspawnctl.1: {variable}: default {default} missing"


def test_no_entry_for_a_variable_that_does_not_exist() -> None:
    documented = {v for v in entries_by_first_word(PAGE_1, "ENVIRONMENT") if "_" in v}
    assert documented <= set(VARIABLES), "stale variables documented"


# --- nspawnctl.yaml(5) --------------------------------------------------------------


@pytest.mark.parametrize("metric", FAMILIES)
def test_every_metric_is_named_in_the_metrics_entry(metric: str) -> None:
    assert mentions(entries_by_first_word(PAGE_1, "COMMANDS")["metrics"], metric), (
        f"nspawnctl.1: the entry of `metrics` does not name {metric}"
    )


@pytest.mark.parametrize("key", config.KNOWN_KEYS)
def test_every_key_has_an_entry(key: str) -> None:
    assert key in entries_by_first_word(PAGE_5, "KEYS"), (
        f"nspawnctl.yaml.5: no entry `.TP` + `.BR {key} ...` under KEYS"
    )


def test_no_entry_for_a_key_that_does_not_exist() -> None:
    known = set(config.KNOWN_KEYS)
    # A mapping (`ssh`) has an entry of its own besides its keys (`ssh.listen`).
    # So has a list of mappings (`sockets` for `sockets[].listen`).
    sections_ = {k.rpartition(".")[0] for k in known if "." in k}
    sections_ |= {k.removesuffix("[]") for k in sections_}
    documented = set(entries_by_first_word(PAGE_5, "KEYS"))
    assert documented <= known | sections_, f"stale: {sorted(documented - known - sections_)}"


@pytest.mark.parametrize("key", sorted(config.PLANNED_KEYS))
def test_every_planned_key_is_listed(key: str) -> None:
    text = "\n".join(filter(None, map(text_line, section(PAGE_5, "PLANNED KEYS"))))
    assert mentions(text, key), f"nspawnctl.yaml.5: {key} is not under PLANNED KEYS"


@pytest.mark.parametrize("key_type", pubkeys.KEY_TYPES)
def test_every_public_key_type_is_listed(key_type: str) -> None:
    text = "\n".join(filter(None, map(text_line, section(PAGE_5, "KEYS"))))
    assert mentions(text, key_type), f"nspawnctl.yaml.5: key type {key_type} is not listed"


def _full_examples() -> list[str]:
    """Every file between the BEGIN/END FULL EXAMPLE comments. No one valid file can
    have every key (`bootstrap.source` is only for templates, which take no `mirror`
    or `packages`), so together they must."""
    lines = PAGE_5.read_text(encoding="utf-8").splitlines()
    begin = '.\\" BEGIN FULL EXAMPLE (tests/unit/test_docs.py parses it)'
    examples = []
    for start in (i for i, line in enumerate(lines) if line == begin):
        end = lines.index('.\\" END FULL EXAMPLE', start)
        examples.append("".join(f"{plain(line)}\n" for line in lines[start + 1 : end]))
    return examples


def test_the_full_examples_are_valid_and_have_every_key(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/alice.pub").write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRoaXNpc2FsaWNlc2tleQ alice@laptop\n"
    )
    file = tmp_path / "web.yaml"
    examples = _full_examples()
    assert examples, "nspawnctl.yaml.5: no FULL EXAMPLE"
    found: set[str] = set()
    for text in examples:
        data = config.load_yaml(text, file)
        config.parse_config("web", data, file)
        found.update(dotted_keys(data))
    assert sorted(found) == sorted(config.KNOWN_KEYS)
    # The first one has a key file relative to the YAML file and a key line.
    first = config.parse_config("web", config.load_yaml(examples[0], file), file)
    assert len(first.ssh.authorized_keys) == 2


# --- rendering ----------------------------------------------------------------------


def _formatter(page: Path) -> list[str]:
    """man as a reader runs it if there is one, else groff itself (-z: no output)."""
    if shutil.which("man"):
        return ["man", "--warnings", "-E", "UTF-8", "-P", "cat", "-l", str(page)]
    if shutil.which("groff"):
        return ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)]
    pytest.skip("neither man nor groff is installed")


@pytest.mark.parametrize("page", [PAGE_1, PAGE_5], ids=lambda p: p.name)
def test_the_page_renders_without_warnings(page: Path) -> None:
    argv = _formatter(page)
    proc = subprocess.run(
        argv,
        env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    if argv[0] == "man":
        assert "NAME" in proc.stdout, "man rendered nothing"
