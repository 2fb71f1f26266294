"""The Ansible collection (contrib/ansible) installs, and ansible-doc reads each
module's documentation, which names every option the module takes and nothing else."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COLLECTION = Path(__file__).resolve().parents[2] / "contrib/ansible"
MODULES = sorted(p.stem for p in (COLLECTION / "plugins/modules").glob("*.py"))
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (BIN / "ansible-galaxy").exists():
        pytest.skip("ansible-core is not installed (pip install -e '.[test]')")
    where = tmp_path_factory.mktemp("collections")
    argv = [str(BIN / "ansible-galaxy"), "collection", "install", str(COLLECTION), "-p", str(where)]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    return where


def _argument_spec(module: str) -> set[str]:
    """The options main() gives AnsibleModule, read from the source."""
    tree = ast.parse((COLLECTION / "plugins/modules" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "argument_spec":
            assert isinstance(node.value, ast.Dict)
            return {str(k.value) for k in node.value.keys if isinstance(k, ast.Constant)}
    raise AssertionError(f"{module}: no argument_spec")


@pytest.mark.parametrize("module", MODULES)
def test_each_module_documents_exactly_its_options(installed: Path, module: str) -> None:
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(installed)}
    argv = [str(BIN / "ansible-doc"), "--json", f"nspawnctl.fleet.{module}"]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    doc = json.loads(done.stdout)[f"nspawnctl.fleet.{module}"]
    assert set(doc["doc"]["options"]) == _argument_spec(module)
    assert doc["examples"].strip() and doc["return"] is not None
