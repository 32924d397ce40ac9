"""Regenerate the parts of docs/ that come from the code; --check only compares.

- docs/design.md: the lifecycle state diagram, from trimperor.core.lifecycle.TABLE
- docs/cli.md: the output of ``trimperor --help``
- docs/control.md: the output of ``trimperor ctl --help`` and of each command
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from trimperor.cli import build_parser
from trimperor.core.lifecycle import mermaid
from trimperor.ctl import build_parser as ctl_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"


def ctl_help() -> str:
    """``trimperor ctl --help``, then each command's own help."""
    parser = ctl_parser()
    parts = [parser.format_help()]
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        choices = getattr(action, "choices", None) or {}
        parts += [sub.format_help() for sub in choices.values()]
    return "\n".join(parts)


def blocks() -> dict[tuple[str, str], str]:
    parser = build_parser()
    parser.prog = "trimperor"
    help_text = parser.format_help()
    return {
        ("design.md", "lifecycle"): f"```mermaid\n{mermaid()}\n```",
        ("cli.md", "help"): f"```text\n{help_text.rstrip()}\n```",
        ("control.md", "ctl-help"): f"```text\n{ctl_help().rstrip()}\n```",
    }


def _replacement(body: str) -> Callable[[re.Match[str]], str]:
    return lambda m: m.group(1) + body + "\n" + m.group(2)


def main(check: bool) -> int:
    stale = []
    for (name, key), body in blocks().items():
        path = DOCS / name
        text = path.read_text()
        pattern = re.compile(
            rf"(<!-- generated:{key} -->\n).*?(<!-- /generated:{key} -->)", re.DOTALL
        )
        if not pattern.search(text):
            print(f"{path}: missing <!-- generated:{key} --> markers", file=sys.stderr)
            return 1
        new = pattern.sub(_replacement(body), text)
        if new != text:
            stale.append(str(path))
            if not check:
                path.write_text(new)
    if stale and check:
        print("generated docs are stale, run: python scripts/gen_docs.py", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
