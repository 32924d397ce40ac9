"""Developer sessions: ``nox -s unit``, ``tests``, ``lint``, ``typecheck``, ``docs``, ``bench``,
``fuzz``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "docs", "tests"]
nox.options.error_on_missing_interpreters = False

PYTHONS = ["3.11", "3.12", "3.13"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite on each Python present."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=["3.12", "3.13"])
def unit(session: nox.Session) -> None:
    """The fast tests (pure core and fakes) on the Pythons CI does not run in full."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not integration", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Check that generated parts of docs/ match the code (lifecycle diagram, CLI help)."""
    session.install("-e", ".")
    session.run("python", "scripts/gen_docs.py", "--check")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks (installs uWSGI from PyPI to compare against)."""
    session.install("-e", ".[examples]", "uwsgi")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The fuzz suite with many more examples than CI runs (tests/test_fuzz.py)."""
    session.install("-e", ".[test]")
    session.run(
        "pytest", "tests/test_fuzz.py", *session.posargs, env={"HYPOTHESIS_PROFILE": "fuzz"}
    )
