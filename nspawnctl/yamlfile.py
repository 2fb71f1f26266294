"""Reading a YAML document that a user, or a hostile archive, wrote: safely, whole or not
at all, with errors that name the line. Knows nothing of what the keys mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nspawnctl.errors import ConfigError

# libyaml's parser, where PyYAML was built with it: 9 times faster than the pure-Python
# one, which made `list` of a thousand containers take most of a second.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """A safe loader that refuses duplicate keys and aliases.

    A duplicate key silently overriding an earlier one hides mistakes; aliases are
    never needed in a container file and are how YAML bombs are built.
    """

    def get_single_node(self) -> yaml.Node | None:
        node: yaml.Node | None = super().get_single_node()
        if node is not None:
            _refuse_aliases(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):
                raise yaml.constructor.ConstructorError(
                    None, None, "keys must be plain words", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _refuse_aliases(root: yaml.Node) -> None:
    """An alias is the node of its anchor used again: a node met twice (before anything
    is constructed, so a YAML bomb never unfolds)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed", node.start_mark
            )
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_yaml(text: str, file: Path) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        # A reader error has no `problem`, and its text names "<unicode string>" on a
        # second line: one line of it is enough.
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(file, "", f"not valid YAML: {where}{problem}") from None
    except RecursionError:
        raise ConfigError(file, "", "not valid YAML: nested too deeply") from None
    except ValueError as err:
        # From PyYAML's constructors: an integer past Python's 4300 digits, a date
        # like 2024-13-45. The rest of the message is about Python, not the file.
        raise ConfigError(file, "", f"not valid YAML: {str(err).split(':')[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            file,
            "",
            f"the document is a {type_name(data)}, expected a mapping of keys",
            hint="start from `nspawnctl add NAME --ssh PORT --key KEY`, or see nspawnctl.yaml(5)",
        )
    return data


def type_name(value: object) -> str:
    return {
        dict: "mapping",
        list: "list",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)
