"""The package's modules stand in layers, and an import never runs upward: a module may
use its own layer and those below. A new module must be placed here; a command shares
helpers with another command through a module below them, never directly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nspawnctl"

# From the bottom up. A module imports only from its own layer and the ones before it.
LAYERS: dict[str, tuple[str, ...]] = {
    "leaves": (
        "__init__",
        "atomic",
        "errors",
        "faults",
        "idmap",
        "listen",
        "log",
        "mounts",
        "names",
        "paths",
        "pubkeys",
        "recipe",
        "resources",
        "screen",
        "security",
        "yamlfile",
    ),
    "config": ("schema", "config"),
    "run and bus": ("run", "bus"),
    "effects": (
        "bootstrap",
        "bootstrap.debootstrap",
        "bootstrap.directory",
        "bootstrap.dnf",
        "bootstrap.tar",
        "cgroup",
        "conflicts",
        "disk",
        "events",
        "guesttree",
        "hold",
        "journal",
        "layers",
        "ssh",
        "store",
        "tcp",
        "userns",
    ),
    "render": ("render",),
    "operations": (
        "backup",
        "container",
        "export",
        "fleet",
        "install",
        "intent",
        "metrics",
        "migrate",
        "reconcile",
        "recovery",
        "sysctl",
        "update",
    ),
    "cli": ("__main__", "cli", "commands", "remote"),
}
LAYER_OF = {module: index for index, names in enumerate(LAYERS.values()) for module in names}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    return name.removesuffix(".__init__") if name != "__init__" else name


def placed(module: str) -> str:
    """A command is in the CLI layer as its package is."""
    return "commands" if module.startswith("commands.") else module


def imports(path: Path) -> set[str]:
    """The package's modules that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in {"nspawnctl", "nspawnctl.commands"}:
                base = node.module.removeprefix("nspawnctl").removeprefix(".")
                for alias in node.names:
                    name = f"{base}.{alias.name}" if base else alias.name
                    # A module of the package, or a name its __init__ defines.
                    found.add(name if name in MODULES else base or "__init__")
            elif node.module.startswith("nspawnctl."):
                found.add(node.module.removeprefix("nspawnctl."))
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("nspawnctl.")
                for a in node.names
                if a.name.startswith("nspawnctl.")
            }
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", MODULES)
def test_every_module_has_a_layer(module: str) -> None:
    assert placed(module) in LAYER_OF, f"{module}: place it in a layer of tests/unit/test_layers.py"


@pytest.mark.parametrize("module", MODULES)
def test_no_import_runs_upward(module: str) -> None:
    own = LAYER_OF[placed(module)]
    upward = sorted(
        f"{dep} ({list(LAYERS)[LAYER_OF[placed(dep)]]})"
        for dep in imports(MODULES[module])
        if LAYER_OF[placed(dep)] > own
    )
    assert not upward, f"{module} ({list(LAYERS)[own]}) imports from above: {upward}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("commands.")])
def test_a_command_imports_no_other_command(module: str) -> None:
    others = sorted(d for d in imports(MODULES[module]) if d.startswith("commands."))
    assert not others, f"{module} imports {others}: share through a module below"


def test_the_imports_have_no_cycle() -> None:
    graph = {m: {d for d in imports(p) if d in MODULES} for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            cycle = (*path[path.index(module) :], module)
            pytest.fail("an import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
