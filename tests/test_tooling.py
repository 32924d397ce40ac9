"""The lint rules of pyproject.toml, each shown catching a violation.

Every case runs the environment's ruff with the project's configuration on a
small snippet, named as if it were a file of the tree: once with the violation
(the rule's code must be reported) and once without it (nothing may be).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SRC = "src/trimperor/example.py"
TEST = "tests/test_example.py"
BENCH = "benchmarks/example.py"

LOGGER = "import logging\n\nlog = logging.getLogger(__name__)\n\n\n"


def ruff(filename: str, source: str) -> list[str]:
    """The codes ruff reports for *source* as the file *filename* of the tree."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--output-format=json",
            "--stdin-filename",
            filename,
            "-",
        ],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr  # 1: violations found
    return sorted(d["code"] for d in json.loads(done.stdout))


# rule: (file name, violating snippet, the same without the violation)
CASES = {
    "G004": (
        SRC,
        LOGGER + 'def f(n: int) -> None:\n    log.info(f"vassal.start n={n}")\n',
        LOGGER + 'def f(n: int) -> None:\n    log.info("vassal.start n=%s", n)\n',
    ),
    "G003": (
        SRC,
        LOGGER + 'def f(event: str) -> None:\n    log.warning(event + " name=%s", "a")\n',
        LOGGER + 'def f(event: str) -> None:\n    log.warning("%s name=%s", event, "a")\n',
    ),
    "G201": (
        SRC,
        LOGGER + "def f() -> None:\n    try:\n        pass\n"
        '    except OSError:\n        log.error("source.crashed", exc_info=True)\n',
        LOGGER + "def f() -> None:\n    try:\n        pass\n"
        '    except OSError:\n        log.exception("source.crashed")\n',
    ),
    "T201": (
        SRC,
        'def f() -> None:\n    print("started")\n',
        'import sys\n\n\ndef f() -> None:\n    sys.stdout.write("started\\n")\n',
    ),
    "TID251": (
        SRC,
        "import time\n\n\ndef f() -> float:\n    return time.time()\n",
        "import trio\n\n\ndef f() -> float:\n    return trio.current_time()\n",
    ),
    "PT011": (
        TEST,
        "import pytest\n\n\ndef test_f() -> None:\n"
        '    with pytest.raises(ValueError):\n        int("x")\n',
        "import pytest\n\n\ndef test_f() -> None:\n"
        '    with pytest.raises(ValueError, match="invalid literal"):\n        int("x")\n',
    ),
    "PT018": (
        TEST,
        "def test_f() -> None:\n    a, b = 1, 2\n    assert a and b\n",
        "def test_f() -> None:\n    a, b = 1, 2\n    assert a\n    assert b\n",
    ),
    "PT017": (
        TEST,
        "def test_f() -> None:\n    try:\n        int('x')\n"
        "    except ValueError as exc:\n        assert 'x' in str(exc)\n",
        "import pytest\n\n\ndef test_f() -> None:\n"
        "    with pytest.raises(ValueError, match=\"'x'\"):\n        int('x')\n",
    ),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_the_rule_catches_its_violation(rule: str) -> None:
    filename, bad, good = CASES[rule]
    assert ruff(filename, bad) == [rule]
    assert ruff(filename, good) == []


# Where the rules deliberately do not apply (per-file-ignores, a noqa with its reason).
ALLOWED = {
    "a wall-clock read that says why": (
        SRC,
        "import time\n\n\ndef f() -> float:\n    return time.time()  # noqa: TID251 (an epoch)\n",
    ),
    "time.time in a test": (TEST, "import time\n\n\ndef test_f() -> None:\n    time.time()\n"),
    "print in a benchmark": (BENCH, 'def main() -> None:\n    print("p50 1.0 ms")\n'),
    "a composite assertion in a benchmark": (
        BENCH,
        "def check(a: int, b: int) -> None:\n    assert a and b\n",
    ),
}


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_what_the_rules_allow(case: str) -> None:
    filename, source = ALLOWED[case]
    assert ruff(filename, source) == []
