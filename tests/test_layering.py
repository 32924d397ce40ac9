"""Each module imports only from its own layer or lower ones (docs/design.md).

:func:`check` takes a module's source text and its dotted name and returns the
rules it breaks; the examples at the end feed it small violating sources so that
every rule is shown to catch what it exists to catch.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "trimperor"

LAYERS = {
    # folders: every module in one has the folder's layer
    "core": 0,
    "vassals": 2,
    "monitors": 2,
    "control": 2,
    "fleet": 2,
    # modules at the top of the package
    "__init__": 0,
    "abc": 1,
    "testing": 2,
    "supervisor": 3,
    "emperor": 3,
    "cli": 4,
    "ctl": 4,
    "__main__": 4,
}
#: Third-party modules the pure core may use (pure parsers only).
PURE_THIRD_PARTY = {"yaml"}
#: Modules that do I/O, run threads or processes, or read a clock: none in the pure core.
IO_MODULES = {
    "trio",
    "anyio",
    "asyncio",
    "socket",
    "ssl",
    "select",
    "selectors",
    "subprocess",
    "multiprocessing",
    "concurrent",
    "threading",
    "_thread",
    "signal",
    "time",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "importlib",
    "watchfiles",
    "inotify_simple",
    "psycopg",
    "pymongo",
    "pika",
    "zmq",
}
#: Calls into those modules that are pure functions of their arguments (no I/O, no clock).
PURE_CALLS = {
    "os.fsencode",
    "os.fsdecode",
    "os.path.basename",
    "os.path.dirname",
    "os.path.splitext",
    "os.path.join",
    "os.path.isabs",
    "os.path.normpath",
    "signal.Signals",  # names and numbers of signals; installing a handler is not allowed
}
PURE_CALL_PATTERNS = [re.compile(r"signal\.SIG[A-Z0-9]+")]  # signal numbers (constants)
#: Impure calls a pure-core module still makes, each with the issue that removes it.
ALLOWED: dict[str, set[str]] = {}
"""Module -> I/O or clock calls it may still make, each with a comment saying why (none now)."""
#: Clock reads through otherwise pure modules.
CLOCK_CALLS = re.compile(r"datetime\.(datetime|date)\.(now|utcnow|today)")


def layer_of(module: str) -> int | None:
    """The layer of ``trimperor.x...`` (``trimperor`` itself is its ``__init__``)."""
    parts = module.split(".")
    return LAYERS.get(parts[1] if len(parts) > 1 else "__init__")


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` in *module*."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join(base + ([name] if name else []))


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for an attribute chain rooted at a name, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def check(source: str, module: str, is_package: bool = False) -> list[str]:
    """The layering rules *source* (the text of the module *module*) breaks."""
    layer = layer_of(module)
    if layer is None:
        return [f"{module}: module missing from the layer table in tests/test_layering.py"]
    tree = ast.parse(source)
    imported: list[tuple[str, int]] = []  # (absolute module name, line)
    bound: dict[str, str] = {}  # local name -> the module (or module.attr) it stands for
    dynamic: list[int] = []  # lines importing a module named at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported.append((alias.name, node.lineno))
                local = alias.asname or alias.name.split(".")[0]
                bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                is_sub = base.split(".")[0] == "trimperor" and _is_module(full)
                imported.append((full if is_sub else base, node.lineno))
                bound[alias.asname or alias.name] = full
    uses = _uses(tree, bound)
    for full, node in uses:
        if full in {"importlib.import_module", "__import__"} and isinstance(node, ast.Call):
            name = _literal_import(node, module)
            if name is None:
                dynamic.append(node.lineno)
            else:
                imported.append((name, node.lineno))
        elif full.startswith("trimperor.") and _is_module(".".join(full.split(".")[:2])):
            imported.append((".".join(full.split(".")[:2]), node.lineno))  # trimperor.x.y

    problems: list[str] = []
    for name, line in imported:
        root = name.split(".")[0]
        if root == "trimperor":
            target = layer_of(name)
            if target is None:
                problems.append(f"{module}:{line} imports unknown module {name}")
            elif target > layer:
                problems.append(f"{module} (L{layer}) imports {name} (L{target}) at line {line}")
        elif (
            layer == 0
            and root not in {*IO_MODULES, *PURE_THIRD_PARTY, "__future__"}
            and (root not in sys.stdlib_module_names)
        ):
            problems.append(f"{module}:{line} is pure core but imports third-party {name}")
    if layer == 0:
        problems += _impure(module, imported, bound, uses, dynamic)
    return problems


def _uses(tree: ast.Module, bound: dict[str, str]) -> list[tuple[str, ast.expr]]:
    """Every read of an imported name (and of ``open``/``__import__``), as its full
    dotted name (``os.path.join`` for ``from os import path; path.join``), with the
    outermost node: the call when the chain is called, else the attribute or name.
    """
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found: list[tuple[str, ast.expr]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Name) or not isinstance(node.ctx, ast.Load):
            continue
        if node.id not in bound and node.id not in {"open", "__import__"}:
            continue
        top: ast.AST = node
        while isinstance(parents.get(top), ast.Attribute):
            top = parents[top]
        assert isinstance(top, ast.expr)
        dotted = _dotted(top) or node.id
        head, _, rest = dotted.partition(".")
        full = ".".join(filter(None, [bound.get(head, head), rest]))
        parent = parents.get(top)
        is_call = isinstance(parent, ast.Call) and parent.func is top
        found.append((full, parent if isinstance(parent, ast.Call) and is_call else top))
    return found


def _literal_import(call: ast.Call, module: str) -> str | None:
    """The module ``import_module("...")``/``__import__("...")`` names, if a literal."""
    if not call.args:
        return None
    first = call.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return None
    name = first.value
    if not name.startswith("."):
        return name
    package = module
    for kw in call.keywords:
        if kw.arg == "package" and isinstance(kw.value, ast.Constant):
            package = str(kw.value.value)
    if len(call.args) > 1 and isinstance(call.args[1], ast.Constant):
        package = str(call.args[1].value)
    level = len(name) - len(name.lstrip("."))
    return _resolve(package, True, level, name.lstrip(".") or None)


def _impure(
    module: str,
    imported: list[tuple[str, int]],
    bound: dict[str, str],
    uses: list[tuple[str, ast.expr]],
    dynamic: list[int],
) -> list[str]:
    """I/O, threads, processes or clocks in a pure-core module."""
    allowed = PURE_CALLS | ALLOWED.get(module, set())
    allowed_roots = {name.split(".")[0] for name in allowed}

    def pure(name: str) -> bool:
        return any(name == a or name.startswith(a + ".") for a in allowed) or any(
            p.fullmatch(name) for p in PURE_CALL_PATTERNS
        )

    problems = [f"{module}:{line} imports a module named at run time" for line in dynamic]
    for name, line in imported:
        root = name.split(".")[0]
        if root in IO_MODULES and root not in allowed_roots:
            problems.append(f"{module}:{line} is pure core but imports {name}")
    for target in bound.values():
        # `from os import listdir`: what is imported must be pure (or lead to what is: os.path)
        root = target.split(".")[0]
        if root in allowed_roots and target not in {root, "os.path"} and not pure(target):
            problems.append(f"{module} is pure core but imports {target}")
    for full, node in uses:
        line = node.lineno
        root = full.split(".")[0]
        if full == "open":
            problems.append(f"{module}:{line} is pure core but calls the builtin open")
        elif root in allowed_roots and not pure(full):
            problems.append(f"{module}:{line} is pure core but uses {full}")
        elif CLOCK_CALLS.fullmatch(full):
            problems.append(f"{module}:{line} is pure core but reads the clock: {full}")
    return problems


def _sources() -> list[tuple[Path, str, bool]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        is_package = rel.name == "__init__"
        parts = rel.parts[:-1] if is_package else rel.parts
        found.append((path, ".".join(("trimperor", *parts)), is_package))
    return found


def test_every_module_keeps_its_layer() -> None:
    problems = []
    for path, name, is_package in _sources():
        problems += check(path.read_text(), name, is_package)
    assert not problems, "\n".join(problems)


def test_every_module_is_in_the_table() -> None:
    for _path, name, _pkg in _sources():
        assert layer_of(name) is not None, name


def test_the_allow_list_is_still_needed() -> None:
    """An entry of ALLOWED that the module no longer needs is stale: remove it."""
    for module, calls in ALLOWED.items():
        path = PACKAGE / Path(*module.split(".")[1:]).with_suffix(".py")
        text = path.read_text()
        for call in calls:
            assert call + "(" in text, f"{module} no longer calls {call}: remove it from ALLOWED"


# -- each rule, shown on a small source that breaks it ---------------------------------------

VIOLATIONS = {
    "absolute from-import of a higher layer": (
        "trimperor.core.model",
        "from trimperor.emperor import Emperor\n",
    ),
    "from the package, a higher-layer module": (
        "trimperor.core.model",
        "from trimperor import emperor\n",
    ),
    "relative import of a module": ("trimperor.core.model", "from .. import emperor\n"),
    "relative import from a module": (
        "trimperor.core.stats",
        "from ..supervisor import Supervisor\n",
    ),
    "relative import two levels up": (
        "trimperor.monitors.files",
        "from ..emperor import Emperor\n",
    ),
    "relative import in a package's __init__": ("trimperor.monitors", "from ..cli import main\n"),
    "attribute-style import": ("trimperor.core.policy", "import trimperor.emperor\n"),
    "attribute-style import, aliased": (
        "trimperor.abc",
        "import trimperor.vassals.spawner as sp\n",
    ),
    "importlib with a literal": (
        "trimperor.vassals.spawner",
        "import importlib\nm = importlib.import_module('trimperor.emperor')\n",
    ),
    "importlib, relative literal": (
        "trimperor.vassals.spawner",
        "from importlib import import_module\nm = import_module('.cli', package='trimperor')\n",
    ),
    "__import__ with a literal": (
        "trimperor.vassals.sockets",
        "m = __import__('trimperor.supervisor')\n",
    ),
    "import time in the pure core": (
        "trimperor.core.policy",
        "import time\nnow = time.monotonic()\n",
    ),
    "from time import in the pure core": ("trimperor.core.policy", "from time import monotonic\n"),
    "os.getcwd in the pure core": ("trimperor.core.model", "import os\nhere = os.getcwd()\n"),
    "os.environ in the pure core": (
        "trimperor.core.model",
        "import os\nhome = os.environ['HOME']\n",
    ),
    "os.path.exists in the pure core": (
        "trimperor.core.configfile",
        "import os.path\nok = os.path.exists('/etc')\n",
    ),
    "from os import in the pure core": ("trimperor.core.model", "from os import listdir\n"),
    "threading in the pure core": ("trimperor.core.reconcile", "import threading\n"),
    "socket in the pure core": ("trimperor.core.uwsgi_protocol", "import socket\n"),
    "subprocess in the pure core": ("trimperor.core.lifecycle", "import subprocess as sp\n"),
    "select in the pure core": ("trimperor.core.stats", "import select\n"),
    "a signal handler in the pure core": (
        "trimperor.core.vassalspec",
        "import signal\nsignal.signal(signal.SIGTERM, print)\n",
    ),
    "the builtin open in the pure core": (
        "trimperor.core.configfile",
        "text = open('x.ini').read()\n",
    ),
    "trio in the pure core": ("trimperor.core.placement", "import trio\n"),
    "the clock through datetime": (
        "trimperor.core.model",
        "import datetime\nnow = datetime.datetime.now()\n",
    ),
    "importlib by a run-time name in the pure core": (
        "trimperor.core.model",
        "import importlib\nm = importlib.import_module(name)\n",
    ),
    "third party in the pure core": ("trimperor.core.model", "import requests\n"),
    "os.getcwd allowed in vassalspec only": (
        "trimperor.core.placement",
        "import os\nd = os.getcwd()\n",
    ),
    "a folder of the pure core importing an adapter folder": (
        "trimperor.core.machine",
        "from trimperor.vassals.sockets import bind\n",
    ),
    "a new module in the core folder is pure too": ("trimperor.core.newthing", "import time\n"),
    "a module outside every folder and the table": ("trimperor.newthing", "import os\n"),
}


#: What the report of each violation names.
CAUGHT_AS = {
    "absolute from-import of a higher layer": "imports trimperor.emperor (L3)",
    "from the package, a higher-layer module": "imports trimperor.emperor (L3)",
    "relative import of a module": "imports trimperor.emperor (L3)",
    "relative import from a module": "imports trimperor.supervisor (L3)",
    "relative import two levels up": "imports trimperor.emperor (L3)",
    "relative import in a package's __init__": "imports trimperor.cli (L4)",
    "attribute-style import": "imports trimperor.emperor (L3)",
    "attribute-style import, aliased": "imports trimperor.vassals.spawner (L2)",
    "importlib with a literal": "imports trimperor.emperor (L3)",
    "importlib, relative literal": "imports trimperor.cli (L4)",
    "__import__ with a literal": "imports trimperor.supervisor (L3)",
    "import time in the pure core": "imports time",
    "from time import in the pure core": "imports time",
    "os.getcwd in the pure core": "uses os.getcwd",
    "os.environ in the pure core": "uses os.environ",
    "os.path.exists in the pure core": "uses os.path.exists",
    "from os import in the pure core": "imports os.listdir",
    "threading in the pure core": "imports threading",
    "socket in the pure core": "imports socket",
    "subprocess in the pure core": "imports subprocess",
    "select in the pure core": "imports select",
    "a signal handler in the pure core": "uses signal.signal",
    "the builtin open in the pure core": "calls the builtin open",
    "trio in the pure core": "imports trio",
    "the clock through datetime": "reads the clock: datetime.datetime.now",
    "importlib by a run-time name in the pure core": "imports a module named at run time",
    "third party in the pure core": "imports third-party requests",
    "os.getcwd allowed in vassalspec only": "uses os.getcwd",
    "a folder of the pure core importing an adapter folder": "imports trimperor.vassals.sockets",
    "a new module in the core folder is pure too": "imports time",
    "a module outside every folder and the table": "missing from the layer table",
}


@pytest.mark.parametrize("rule", list(VIOLATIONS))
def test_a_violation_is_caught(rule: str) -> None:
    module, text = VIOLATIONS[rule]
    problems = check(text, module, is_package=module == "trimperor.monitors")
    assert any(CAUGHT_AS[rule] in problem for problem in problems), (text, problems)


ALLOWED_SOURCES = {
    "a lower layer": (
        "trimperor.emperor",
        "from trimperor.core.model import Upsert\nfrom .core import policy\n",
    ),
    "a sibling in the package": ("trimperor.monitors.files", "from .remote import SourceStatus\n"),
    "the same layer, attribute-style": ("trimperor.emperor", "import trimperor.supervisor\n"),
    "pure os.path string functions": (
        "trimperor.core.model",
        "import os\nname = os.path.basename(os.path.join('a', 'b'))\nb = os.fsencode(name)\n",
    ),
    "signal names and numbers": (
        "trimperor.core.vassalspec",
        "import signal\nn = signal.SIGTERM\nm = signal.Signals.__members__.get('SIGINT')\n",
    ),
    "datetime as a pure conversion": (
        "trimperor.core.model",
        "import datetime\nd = datetime.datetime.fromtimestamp(0, datetime.UTC)\n",
    ),
    "I/O outside the pure core": (
        "trimperor.vassals.spawner",
        "import os, time\nos.getcwd()\ntime.time()\n",
    ),
    "a method named open": ("trimperor.core.model", "def f(x):\n    return x.open()\n"),
}


@pytest.mark.parametrize("source", ALLOWED_SOURCES.values(), ids=list(ALLOWED_SOURCES))
def test_what_is_allowed_passes(source: tuple[str, str]) -> None:
    module, text = source
    assert check(text, module) == []
