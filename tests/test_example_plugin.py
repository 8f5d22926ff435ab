"""The example plugin, ``examples/csvimg-postgres``, as a third party ships it.

Its package declares the entry point, the guide's snippets point at code
that exists, and, when it is installed (CI installs it), csvimg finds it
through the entry point and its own test suite (csvimg's contract suite
against the machine's PostgreSQL) passes. Without the package installed
these tests skip with the command that installs it, except under
``CSVIMG_REQUIRE_SERVICES=1``, where that is a failure.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from csvimg import Settings
from csvimg.plugins import PROJECT, Plugins

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "csvimg-postgres"
REQUIRE_ENV = "CSVIMG_REQUIRE_SERVICES"


def _pyproject() -> dict[str, Any]:
    with (EXAMPLE / "pyproject.toml").open("rb") as fp:
        return tomllib.load(fp)


def _require_installed() -> None:
    names = {ep.name for ep in importlib.metadata.entry_points(group=PROJECT)}
    if "postgres" in names:
        return
    message = (
        "the example plugin is not installed; "
        f"run: .venv/bin/pip install -e {EXAMPLE.relative_to(ROOT)}"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


def test_package_declares_the_entry_point() -> None:
    project = _pyproject()["project"]
    assert project["entry-points"][PROJECT] == {"postgres": "csvimg_postgres"}
    dependencies = project["dependencies"]
    assert "csvimg" in dependencies
    assert any(d.startswith("psycopg[binary]") for d in dependencies)
    assert (EXAMPLE / "src" / "csvimg_postgres" / "py.typed").is_file()


def test_its_tests_run_the_shipped_contract_suite() -> None:
    tree = ast.parse((EXAMPLE / "tests" / "test_contract.py").read_text(encoding="utf-8"))
    bases = {
        base.id
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        for base in node.bases
        if isinstance(base, ast.Name)
    }
    assert {"StorageContract", "QueueContract"} <= bases


def test_guide_snippets_exist() -> None:
    """Every ``--8<-- "file:section"`` of docs/plugins.md names a real section."""
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    snippets = re.findall(r'--8<-- "([^"]+)"', guide)
    assert snippets
    for snippet in snippets:
        path, _, section = snippet.partition(":")
        text = (ROOT / path).read_text(encoding="utf-8")
        if section:
            assert f"--8<-- [start:{section}]" in text, f"{path} has no section {section}"
            assert f"--8<-- [end:{section}]" in text, f"{path} does not end section {section}"


def test_entry_point_serves_postgres_urls() -> None:
    _require_installed()
    # Imported by name: the main type check must not need the example installed.
    example = importlib.import_module("csvimg_postgres")
    plugins = Plugins()
    for scheme in ("postgresql", "postgres"):
        url = f"{scheme}://127.0.0.1/test"
        assert isinstance(plugins.storage(url, Settings()), example.PostgresStorage)
        assert isinstance(plugins.queue(url, Settings()), example.PostgresQueue)
    blocked = Plugins(environ={"CSVIMG_DISABLED_PLUGINS": "postgres"})
    assert "postgresql" not in blocked.registry.storage


@pytest.mark.slow
def test_example_suite_passes() -> None:
    """The example's own tests: the contract suite on the machine's PostgreSQL."""
    _require_installed()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"the example plugin's tests failed:\n{output}"
    if " skipped" in output and " passed" not in output:
        pytest.skip(f"the example's tests all skipped:\n{output[-2000:]}")
