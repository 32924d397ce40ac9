"""Developer sessions: ``nox -s unit``, ``tests``, ``lint``, ``typecheck``, ``docs``, ``coverage``,
``bench``, ``fuzz``.

Each Python a session names must be present: a missing one fails the run
instead of skipping it (``scripts/test`` puts pyenv's Pythons on PATH).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "docs", "tests"]
nox.options.error_on_missing_interpreters = True

PYTHONS = ["3.11", "3.12", "3.13"]
#: The project with every extra the tests exercise (python-ldap builds against libldap).
PROJECT = ("-e", ".[all,ldap,examples]")


def install(session: nox.Session, group: str) -> None:
    """The project and a dependency group of pyproject.toml (pip >= 25.1)."""
    session.install(*PROJECT, "--group", group)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite on each Python."""
    install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python=["3.12", "3.13"])
def unit(session: nox.Session) -> None:
    """The fast tests (pure core and fakes) on the Pythons CI does not run in full."""
    install(session, "test")
    session.run("pytest", "-m", "not integration", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install(session, "dev")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Check that generated parts of docs/ match the code (lifecycle diagram, CLI help)."""
    session.install("-e", ".")
    session.run("python", "scripts/gen_docs.py", "--check")


@nox.session
def coverage(session: nox.Session) -> None:
    """Lines of src/ the unit suite runs, in the test process; the README gives the
    figure. The whole suite under measurement is slower than its bounds allow on a busy
    machine; ``nox -s coverage -- -m ""`` tries it."""
    install(session, "coverage")
    session.run("coverage", "erase")
    args = session.posargs or ["-m", "not integration"]
    session.run("coverage", "run", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args)
    session.run("coverage", "combine", "-q")
    session.run("coverage", "report")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks (installs uWSGI from PyPI to compare against)."""
    session.install("-e", ".[examples]", "uwsgi")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The fuzz suite with many more examples than CI runs (tests/test_fuzz.py)."""
    install(session, "test")
    session.run(
        "pytest", "tests/test_fuzz.py", *session.posargs, env={"HYPOTHESIS_PROFILE": "fuzz"}
    )
