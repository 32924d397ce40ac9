"""Each module imports only from its own layer or lower ones (docs/design.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "trimperor"

LAYERS = {
    "errors": 0,
    "model": 0,
    "configfile": 0,
    "vassalspec": 0,
    "lifecycle": 0,
    "machine": 0,
    "policy": 0,
    "reconcile": 0,
    "stats": 0,
    "uwsgi_protocol": 0,
    "placement": 0,
    "abc": 1,
    "asuser": 2,
    "launcher": 2,
    "_launcher": 2,
    "etcd": 2,
    "fleet": 2,
    "spawner": 2,
    "uwsgi": 2,
    "sockets": 2,
    "armory": 2,
    "notify": 2,
    "api": 2,
    "control": 2,
    "surfaces": 2,
    "vassallogs": 2,
    "health": 2,
    "metrics": 2,
    "dashboard": 2,
    "monitors": 2,
    "testing": 2,
    "supervisor": 3,
    "emperor": 3,
    "cli": 4,
    "ctl": 4,
    "__main__": 4,
    "__init__": 0,
}
#: Third-party modules the pure core may use (pure parsers only).
PURE_THIRD_PARTY = {"yaml"}
IO_MODULES = {"trio", "socket", "subprocess", "watchfiles", "psycopg", "pymongo", "pika", "zmq"}


def module_layer(path: Path) -> tuple[str, int]:
    rel = path.relative_to(PACKAGE).with_suffix("")
    top = rel.parts[0]
    assert top in LAYERS, f"{rel}: module missing from the layer table in tests/test_layering.py"
    return ".".join(rel.parts), LAYERS[top]


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_layers() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name, layer = module_layer(path)
        for imported in imports(path):
            root = imported.split(".")[0]
            if root == "trimperor":
                parts = imported.split(".")
                if len(parts) == 1:
                    continue
                target = LAYERS.get(parts[1])
                assert target is not None, f"{name} imports unknown module {imported}"
                if target > layer:
                    problems.append(f"{name} (L{layer}) imports {imported} (L{target})")
            elif layer == 0 and root in IO_MODULES:
                problems.append(f"{name} is pure core but imports {imported}")
    assert not problems, "\n".join(problems)


def test_pure_core_is_really_pure() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        name, layer = module_layer(path)
        if layer != 0:
            continue
        for imported in imports(path):
            root = imported.split(".")[0]
            assert root not in IO_MODULES, f"{name} imports {imported}"
            assert root == "trimperor" or root in PURE_THIRD_PARTY or _is_stdlib(root), (
                f"{name} imports third-party {imported}"
            )


def _is_stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names or name == "__future__"
