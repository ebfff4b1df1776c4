"""Static checks of the package's boundaries: no private attribute of another library is used."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ingest"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _defined_names(trees: dict[Path, ast.Module]) -> set[str]:
    """Every private name the package defines: module globals, functions, classes, class
    attributes, attributes assigned on ``self`` or ``cls``, and ``__slots__`` entries."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                names.update(
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )
    return {name for name in names if _private(name)}


def _violations(trees: dict[Path, ast.Module]) -> list[str]:
    ours = _defined_names(trees)
    found: list[str] = []
    for path, tree in trees.items():
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                value = node.value
                if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                    continue
                if node.attr not in ours:
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                # getattr(x, "_name"), setattr(x, "_name", ...), hasattr(x, "_name")
                if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and node.args[1:]:
                    name = node.args[1]
                    text = name.value if isinstance(name, ast.Constant) else None
                    if isinstance(text, str) and _private(text) and text not in ours:
                        found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] == "ingest":
                    continue
                parts = node.module.split(".") + [alias.name for alias in node.names]
                if any(_private(part) for part in parts):
                    found.append(f"{where}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != "ingest" and any(
                        _private(part) for part in alias.name.split(".")
                    ):
                        found.append(f"{where}:{node.lineno}: import {alias.name}")
    return found


def test_no_private_attribute_of_another_library_is_used() -> None:
    assert _violations(_trees()) == []


def test_the_check_finds_what_it_is_for() -> None:
    """The rule, on code in the shape the source once had (aiomqtt's client reached into)."""
    sample = ast.parse(
        "import paho.mqtt._packet\n"
        "from paho.mqtt import _packet\n"
        "class Ours:\n"
        "    def __init__(self, client):\n"
        "        self._mine = 1\n"
        "        inner = getattr(client, '_client')\n"
        "        inner._packet_queue(1, b'', 0, 0)\n"
        "        client._in_packet = {}\n"
        "    def fine(self, other: 'Ours'):\n"
        "        return other._mine, self._anything\n"
    )
    found = _violations({PACKAGE / "sample.py": sample})
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "client._in_packet",
        "from paho.mqtt import ...",
        "getattr(client, '_client')",
        "import paho.mqtt._packet",
        "inner._packet_queue",
    ]


def test_paho_is_not_a_direct_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [dep.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
             for dep in project["dependencies"]]  # fmt: skip
    assert "paho-mqtt" not in names
    for path, tree in _trees().items():
        for node in ast.walk(tree):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(m.split(".")[0] == "paho" for m in modules), (
                f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}: the hot path speaks MQTT through ingest.mqtt"
            )
