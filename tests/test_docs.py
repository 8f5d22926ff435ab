"""The documentation is complete, in sync with the code, and builds strictly.

Meta-tests in the style of datasette's ``test_plugin_hooks_are_documented``:
each fails when something new in the code is missing from the docs (a hook,
a public name, a CLI option, a ``CSVIMG_*`` variable, an endpoint), naming
what is missing and where it belongs.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import csvimg
from csvimg import hooks

# PyYAML comes with mkdocs; imported untyped (no stub package needed).
yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src"
TESTS = ROOT / "tests"

# A variable name, not a prefix being talked about (``CSVIMG_FETCH_*``) nor
# part of a longer token (``__CSVIMG_VERSION__``).
_VARIABLE = re.compile(r"(?<![A-Za-z0-9_])CSVIMG_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_*])")


def _page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


@cache
def _hooks_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("csvimg_docs_hooks", DOCS / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------- plugin hooks


def hook_specs() -> list[str]:
    """Names of every hook specification of csvimg."""
    marker = f"{hooks.PROJECT}_spec"  # the attribute pluggy's HookspecMarker sets
    return sorted(name for name, value in vars(hooks.HookSpecs).items() if hasattr(value, marker))


def test_hook_specs_are_found() -> None:
    assert "csvimg_register_backends" in hook_specs()


@pytest.mark.parametrize("hook", hook_specs())
def test_plugin_hooks_are_documented(hook: str) -> None:
    """Each hook has its own heading in the plugin guide."""
    assert f"### `{hook}`" in _page("plugins.md"), (
        f"hook {hook} is not documented: add a '### `{hook}`' section to docs/plugins.md"
    )


@pytest.mark.parametrize("hook", hook_specs())
def test_plugin_hooks_have_tests(hook: str) -> None:
    """Each hook is exercised by some test module other than this one."""
    here = Path(__file__).name
    users = [
        p.name
        for p in sorted(TESTS.glob("test_*.py"))
        if p.name != here and hook in p.read_text(encoding="utf-8")
    ]
    assert users, f"hook {hook} has no test: no tests/test_*.py mentions it"


# -------------------------------------------------------------- Python API


def _reexports() -> dict[str, str]:
    """Map each name `csvimg/__init__.py` imports from a submodule to that module.

    Names loaded lazily (Pillow's and aiohttp's) are imported for type
    checkers under ``if TYPE_CHECKING:``; those imports count too.
    """
    tree = ast.parse((SRC / "csvimg" / "__init__.py").read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    nodes: list[ast.stmt] = []
    for node in tree.body:
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes.extend(node.body)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("csvimg"):
            for alias in node.names:
                found[alias.asname or alias.name] = node.module
    return found


def _api_directives() -> dict[str, dict[str, Any]]:
    """The ``::: module`` directives of docs/api.md and their options."""
    directives: dict[str, dict[str, Any]] = {}
    text = _page("api.md")
    for match in re.finditer(r"^::: (\S+)\n((?:    .*\n|\n)*)", text, re.MULTILINE):
        block = match.group(2)
        options = yaml.safe_load(re.sub(r"^    ", "", block, flags=re.MULTILINE)) or {}
        directives[match.group(1)] = options.get("options", {})
    return directives


def public_names() -> list[str]:
    """`csvimg.__all__` without the version string."""
    return [n for n in csvimg.__all__ if n != "__version__"]


@pytest.mark.parametrize("name", public_names())
def test_public_name_is_in_the_api_reference(name: str) -> None:
    """The module that defines it is rendered by mkdocstrings, the name among its members."""
    module = _reexports().get(name)
    assert module is not None, f"csvimg.{name} is not imported from a csvimg submodule"
    directives = _api_directives()
    assert module in directives, (
        f"csvimg.{name} comes from {module}, which docs/api.md does not render: add '::: {module}'"
    )
    members = directives[module].get("members")
    if members is not None:
        assert name in members, (
            f"docs/api.md renders {module} but not {name}: add it to the 'members:' list"
        )


@pytest.mark.parametrize("name", public_names())
def test_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(csvimg, name)
    if isinstance(obj, (str, int, float, tuple, frozenset)):
        return  # constants: documented by the attribute docstring in their module
    assert (obj.__doc__ or "").strip(), f"csvimg.{name} has no docstring"


# ------------------------------------------------------------------ README


def readme_commands() -> list[str]:
    """The README's two set-up commands (the ``sh`` blocks that install)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
    commands = [b.strip() for b in blocks if "pip install" in b and "python3 -m venv" in b]
    assert len(commands) == 2, f"expected the README's two set-up commands, got {commands}"
    return commands


@pytest.mark.parametrize("page", ["index.md", "getting-started.md"])
@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_are_in_the_docs(page: str, command: str) -> None:
    assert command in _page(page), f"docs/{page} lacks the README's command: {command}"


def test_ci_runs_the_readme_test_command() -> None:
    """CI must call the very test command the README gives."""
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.splitlines(), ".ci/run does not run the README's test command"
    assert "export CSVIMG_REQUIRE_SERVICES=1" in ci


# ----------------------------------------------------------- configuration


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from csvimg_server.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _section(text: str, command: str) -> str:
    """The part of the configuration page about ``csvimg <command>``."""
    heading = rf"^### `csvimg {re.escape(command)}`\n(.*?)(?=^##)"
    match = re.search(heading, text + "\n##", re.MULTILINE | re.DOTALL)
    assert match is not None, f"docs/configuration.md has no '### `csvimg {command}`' section"
    return match.group(1)


def cli_options() -> list[tuple[str, str]]:
    """(command, option or positional metavar) for every argument of every command."""
    found: list[tuple[str, str]] = []
    for command, parser in _subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                found.extend((command, o) for o in action.option_strings if o.startswith("--"))
            else:
                found.append((command, str(action.metavar or action.dest)))
    return found


def test_every_command_has_a_section() -> None:
    text = _page("configuration.md")
    for command in _subcommands():
        _section(text, command)


@pytest.mark.parametrize(("command", "option"), cli_options())
def test_cli_option_is_documented(command: str, option: str) -> None:
    section = _section(_page("configuration.md"), command)
    assert re.search(rf"`{re.escape(option)}[ `]", section), (
        f"csvimg {command} {option} is not in docs/configuration.md (section "
        f"'csvimg {command}'): add a row for it"
    )


def environment_variables() -> list[str]:
    """Every ``CSVIMG_*`` variable named in the source."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        names.update(_VARIABLE.findall(path.read_text(encoding="utf-8")))
    return sorted(names)


def test_variables_are_found() -> None:
    found = environment_variables()
    assert {"CSVIMG_STORAGE", "CSVIMG_FETCH_ALLOW", "CSVIMG_DISABLED_PLUGINS"} <= set(found)
    assert "CSVIMG_FETCH" not in found  # "CSVIMG_FETCH_*" is a prefix, not a variable


@pytest.mark.parametrize("variable", environment_variables())
def test_environment_variable_is_documented(variable: str) -> None:
    assert f"`{variable}`" in _page("configuration.md"), (
        f"{variable} is read by the code but not in docs/configuration.md: add it with "
        "its default and meaning"
    )


# ---------------------------------------------------------------- HTTP API


def operations() -> list[tuple[str, str]]:
    from csvimg_server.openapi import openapi_document

    return [
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]


def test_http_reference_renders_every_operation() -> None:
    from csvimg_server.openapi import openapi_document

    hooks = _hooks_module()
    assert hooks.OPENAPI_PLACEHOLDER in _page("http-api.md")
    rendered = hooks.render_openapi(openapi_document())
    for method, path in operations():
        assert f"### `{method} {path}`" in rendered, f"{method} {path} is not rendered"
    for name in openapi_document()["components"]["schemas"]:
        assert f"### {name} " in rendered, f"schema {name} is not rendered"


def test_optional_pages_are_unlinked_while_missing() -> None:
    hooks = _hooks_module()
    config = {"docs_dir": str(DOCS)}
    missing = {n for n in hooks.OPTIONAL_PAGES if not (DOCS / n).exists()}
    for name in missing:
        text = f"see [that page]({name}#part) and [again]({name})"
        assert hooks.on_page_markdown(text, None, config, None) == "see that page and again"
    nav = [{"A": "a.md"}, {"G": [{"X": "x.md"}, *({"M": n} for n in missing)]}]
    assert hooks._prune(nav, missing) == [{"A": "a.md"}, {"G": [{"X": "x.md"}]}]


# -------------------------------------------------------------------- site


def _nav_files(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return set().union(*(_nav_files(e) for e in nav)) if nav else set()
    if isinstance(nav, dict):
        return set().union(*(_nav_files(v) for v in nav.values())) if nav else set()
    return set()


def _mkdocs_config() -> dict[str, Any]:
    # mkdocs.yml names a Python function with !!python/name: keep it as text.
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").replace("!!python/name:", "")
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def test_every_page_is_in_the_nav() -> None:
    in_nav = _nav_files(_mkdocs_config()["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - in_nav == set(), "pages missing from the nav in mkdocs.yml"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds, and the site holds what it should."""
    pytest.importorskip("mkdocs", reason="mkdocs comes with the dev extra")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"

    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in public_names():
        anchor = f'id="{_reexports()[name]}.{name}"'
        assert anchor in api, f"the Python API page renders no {anchor}"
    http = (site / "http-api" / "index.html").read_text(encoding="utf-8")
    for method, path in operations():
        assert f"{method} {path}" in http, f"the HTTP API page lacks {method} {path}"
    assert (site / "openapi.json").is_file()
    guide = (site / "plugins" / "index.html").read_text(encoding="utf-8")
    # The snippets from examples/ were included, not left empty.
    assert "_pool" in guide  # csvimg-postgres's apply
    assert "ShelfStorage" in guide  # the walk-through
    assert "registry.add_storage" in guide
    assert not (site / "hooks.py").exists()
