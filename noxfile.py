"""Developer tasks: ``nox -s tests lint typecheck docs bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the test suite (CSVIMG_REQUIRE_SERVICES=1 makes service skips fail)."""
    session.install("-e", ".[dev]", "-e", "examples/csvimg-postgres")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Ruff: lint."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "bench", "noxfile.py", "docs", "examples")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src and tests."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly."""
    session.install("-e", ".[dev]")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the benchmarks and rewrite docs/performance.md."""
    session.install("-e", ".[dev,bench]")
    session.run("python", "-m", "bench", *session.posargs)
