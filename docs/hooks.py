"""MkDocs hooks of the csvimg site (registered under ``hooks:`` in ``mkdocs.yml``).

* The HTTP API reference is generated at build time from the server's own
  OpenAPI document (`csvimg_server.openapi.openapi_document`): the page
  ``http-api.md`` holds the placeholder `OPENAPI_PLACEHOLDER`, replaced by
  `render_openapi`, so the reference can never drift from the code. The
  document itself is written next to the site as ``openapi.json``.
* Pages other people write later (`OPTIONAL_PAGES`) may be listed in the
  nav and linked before they exist: while one is missing, its nav entry is
  dropped and links to it become plain text, so ``mkdocs build --strict``
  stays green either way.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "OPENAPI_PLACEHOLDER",
    "OPTIONAL_PAGES",
    "on_config",
    "on_page_markdown",
    "on_post_build",
    "render_openapi",
]

log = logging.getLogger("mkdocs.hooks.csvimg")

OPENAPI_PLACEHOLDER = "<!-- openapi-reference -->"
"""Where `render_openapi`'s markdown goes in ``http-api.md``."""

OPTIONAL_PAGES = frozenset({"celery.md", "performance.md", "security.md"})
"""Pages that may not exist yet; see the module docstring."""

_METHODS = ("get", "post", "put", "patch", "delete")


# ----------------------------------------------------------------- OpenAPI


def _schema_anchor(name: str) -> str:
    return "schema-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _operation_anchor(method: str, path: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")
    return f"{method}-{slug}"


def _cell(text: str) -> str:
    """Make *text* safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _type(schema: Mapping[str, Any]) -> str:
    """Describe a JSON Schema in a few words, with links to named schemas."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return f"[{name}](#{_schema_anchor(name)})"
    for combiner, word in (("oneOf", " or "), ("anyOf", " or "), ("allOf", " and ")):
        if combiner in schema:
            return word.join(_type(s) for s in schema[combiner])
    kind = schema.get("type", "any")
    kinds = [str(k) for k in kind] if isinstance(kind, list) else [str(kind)]
    words = []
    for k in kinds:
        if k == "array":
            words.append(f"array of {_type(schema.get('items', {}))}")
        elif k == "string" and schema.get("format"):
            words.append(f"string ({schema['format']})")
        else:
            words.append(k)
    return " \\| ".join(words)


def _constraints(schema: Mapping[str, Any]) -> str:
    """The schema's limits, enum and default, as short text."""
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    if "minimum" in schema and "maximum" in schema:
        parts.append(f"{schema['minimum']} to {schema['maximum']}")
    elif "minimum" in schema:
        parts.append(f"at least {schema['minimum']}")
    elif "maximum" in schema:
        parts.append(f"at most {schema['maximum']}")
    if "pattern" in schema:
        parts.append(f"matches `{schema['pattern']}`")
    if "contentMediaType" in schema:
        parts.append(f"a `{schema['contentMediaType']}` file")
    if "default" in schema:
        parts.append(f"default `{json.dumps(schema['default'])}`")
    return "; ".join(parts)


def _describe(schema: Mapping[str, Any]) -> str:
    text = str(schema.get("description", ""))
    limits = _constraints(schema)
    if limits:
        text = f"{text} ({limits})" if text else limits.capitalize()
    return _cell(text)


def _properties_table(schema: Mapping[str, Any]) -> list[str]:
    props: Mapping[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    lines = ["| Field | Type | Required | Description |", "| --- | --- | --- | --- |"]
    for name, prop in props.items():
        lines.append(
            f"| `{name}` | {_type(prop)} | {'yes' if name in required else 'no'} "
            f"| {_describe(prop)} |"
        )
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        lines.append(f"| *any name* | {_type(extra)} | no | {_describe(schema)} |")
    return lines


def _parameters(op: Mapping[str, Any]) -> list[str]:
    params: list[Mapping[str, Any]] = list(op.get("parameters", ()))
    if not params:
        return []
    lines = [
        "**Parameters**",
        "",
        "| Name | In | Type | Required | Description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in params:
        schema: Mapping[str, Any] = p.get("schema", {})
        description = _cell(str(p.get("description", "")))
        limits = _constraints(schema)
        if limits:
            description = f"{description} ({limits})" if description else limits.capitalize()
        lines.append(
            f"| `{p['name']}` | {p['in']} | {_type(schema)} "
            f"| {'yes' if p.get('required') else 'no'} | {description} |"
        )
    return [*lines, ""]


def _request_body(op: Mapping[str, Any]) -> list[str]:
    body: Mapping[str, Any] | None = op.get("requestBody")
    if not body:
        return []
    lines = []
    for media, content in body.get("content", {}).items():
        schema: Mapping[str, Any] = content.get("schema", {})
        required = "required" if body.get("required") else "optional"
        lines += [f"**Request body** ({required}): `{media}`", ""]
        if "properties" in schema:
            lines += [*_properties_table(schema), ""]
        else:
            lines += [f"A {_type(schema)}.", ""]
    return lines


def _responses(op: Mapping[str, Any]) -> list[str]:
    lines = [
        "**Responses**",
        "",
        "| Status | Content | Description |",
        "| --- | --- | --- |",
    ]
    responses: Mapping[str, Any] = op.get("responses", {})
    for status, response in sorted(responses.items(), key=lambda kv: str(kv[0])):
        contents = []
        for media, content in response.get("content", {}).items():
            schema = content.get("schema")
            contents.append(f"`{media}` {_type(schema)}" if schema else f"`{media}`")
        headers = response.get("headers", {})
        description = _cell(str(response.get("description", "")))
        if headers:
            description += " Headers: " + ", ".join(f"`{h}`" for h in headers) + "."
        lines.append(f"| **{status}** | {'<br>'.join(contents) or '—'} | {description} |")
    return [*lines, ""]


def render_openapi(document: Mapping[str, Any]) -> str:
    """Render an OpenAPI 3 document as markdown: endpoints, then schemas."""
    paths: Mapping[str, Mapping[str, Any]] = document.get("paths", {})
    info: Mapping[str, Any] = document.get("info", {})
    out: list[str] = []
    if info.get("description"):
        out += [str(info["description"]), ""]
    out += ["## Endpoints", "", "| Method | Path | Summary |", "| --- | --- | --- |"]
    for path, item in paths.items():
        for method in _METHODS:
            if method in item:
                anchor = _operation_anchor(method, path)
                out.append(
                    f"| `{method.upper()}` | [`{path}`](#{anchor}) "
                    f"| {_cell(str(item[method].get('summary', '')))} |"
                )
    out.append("")
    for path, item in paths.items():
        for method in _METHODS:
            if method not in item:
                continue
            op: Mapping[str, Any] = item[method]
            anchor = _operation_anchor(method, path)
            out += [f"### `{method.upper()} {path}` {{#{anchor}}}", ""]
            if op.get("summary"):
                out += [f"*{op['summary']}.*", ""]
            if op.get("description"):
                out += [str(op["description"]), ""]
            out += _parameters(op)
            out += _request_body(op)
            out += _responses(op)
    schemas: Mapping[str, Mapping[str, Any]] = document.get("components", {}).get("schemas", {})
    if schemas:
        out += ["## Schemas", ""]
        for name, schema in schemas.items():
            out += [f"### {name} {{#{_schema_anchor(name)}}}", ""]
            if schema.get("description"):
                out += [str(schema["description"]), ""]
            if "properties" in schema:
                out += [*_properties_table(schema), ""]
            else:
                out += [f"A {_type(schema)}.", ""]
    return "\n".join(out)


def _openapi() -> dict[str, Any]:
    from csvimg_server.openapi import openapi_document

    return openapi_document()


# ------------------------------------------------------------ optional pages


def _missing_optional(docs_dir: str) -> set[str]:
    return {name for name in OPTIONAL_PAGES if not (Path(docs_dir) / name).is_file()}


def _prune(nav: Iterable[Any], missing: set[str]) -> list[Any]:
    kept: list[Any] = []
    for entry in nav:
        if isinstance(entry, str):
            if entry not in missing:
                kept.append(entry)
        elif isinstance(entry, dict):
            pruned = {}
            for title, value in entry.items():
                if isinstance(value, list):
                    value = _prune(value, missing)
                    if not value:
                        continue
                elif isinstance(value, str) and value in missing:
                    continue
                pruned[title] = value
            if pruned:
                kept.append(pruned)
        else:  # pragma: no cover - mkdocs nav entries are str or dict
            kept.append(entry)
    return kept


# ------------------------------------------------------------------- hooks


def on_config(config: Any) -> Any:
    """Drop nav entries of optional pages that do not exist (yet)."""
    missing = _missing_optional(config["docs_dir"])
    if missing and config.get("nav"):
        config["nav"] = _prune(config["nav"], missing)
        log.info("optional pages not written yet: %s", ", ".join(sorted(missing)))
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Insert the generated HTTP reference; unlink missing optional pages."""
    if OPENAPI_PLACEHOLDER in markdown:
        markdown = markdown.replace(OPENAPI_PLACEHOLDER, render_openapi(_openapi()))
    for name in _missing_optional(config["docs_dir"]):
        # [text](celery.md) or [text](celery.md#anchor) -> text
        markdown = re.sub(r"\[([^\]]+)\]\(" + re.escape(name) + r"(?:#[^)]*)?\)", r"\1", markdown)
    return markdown


def on_post_build(config: Any) -> None:
    """Publish the OpenAPI document beside the site as ``openapi.json``."""
    target = Path(config["site_dir"]) / "openapi.json"
    target.write_text(json.dumps(_openapi(), indent=2) + "\n", encoding="utf-8")
