"""Typed JSON bodies whose JSON Schema is derived from their fields.

A body of the HTTP API is a frozen attrs class deriving from `Shape`: the
handlers build it (so mypy checks every key and its type), `Shape.to_json`
writes it, and `Shape.json_schema` describes it for ``/openapi.json``. The
schema comes from the field types, so the two cannot drift apart:

==========================  ===============================================
field type                  JSON Schema
==========================  ===============================================
``str`` / ``int`` / ``bool``  ``string`` / ``integer`` / ``boolean``
``X | None``                ``X`` or ``null`` (a key that is always there)
``Literal["a", "b"]``       ``string`` with ``enum``
a `enum.Enum` subclass      ``string`` with the members' values as ``enum``
``list[X]``                 ``array`` of ``X``
``dict[str, X]``            ``object`` with ``X`` values
a `Shape` subclass          ``$ref`` to its component
``Annotated[T, Encoded]``   the `Encoded` schema (and its ``dump``)
==========================  ===============================================

A field's ``metadata=schema(...)`` adds schema keywords (``description``,
``minimum``, ...). A field whose default is None is an optional key: left
out of the body while its value is None (so neither required nor
nullable); every other field is a required key. The first paragraph of
the class docstring is the schema's ``description``. Every body is closed
(``additionalProperties: false``) unless its class sets ``closed = False``.
"""

from __future__ import annotations

import enum
import inspect
import types
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import (
    Annotated,
    Any,
    ClassVar,
    Final,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import attrs
from starlette.responses import JSONResponse

__all__ = [
    "Encoded",
    "Shape",
    "Timestamp",
    "Uri",
    "Uuid",
    "iso_time",
    "ref",
    "schema",
]

_SCHEMA: Final = "csvimg.schema"


def iso_time(ts: float) -> str:
    """Format epoch seconds as ISO-8601 UTC (``2024-05-01T12:00:00.123456Z``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@attrs.frozen(eq=False)  # hashed by identity: typing hashes Annotated metadata
class Encoded:
    """An `Annotated` marker: the schema of a value, and how it is written.

    *dump* turns the Python value into its JSON form (identity when None).
    """

    schema: Mapping[str, Any]
    dump: Callable[[Any], Any] | None = None


Uuid = Annotated[str, Encoded({"type": "string", "format": "uuid"})]
"""A request id: a canonical UUID."""
Uri = Annotated[str, Encoded({"type": "string", "format": "uri"})]
"""An absolute URL."""
Timestamp = Annotated[float, Encoded({"type": "string", "format": "date-time"}, iso_time)]
"""Epoch seconds, written as ISO-8601 UTC (`iso_time`)."""


def schema(description: str | None = None, **keywords: Any) -> dict[str, Any]:
    """The ``metadata`` of a `Shape` field: JSON Schema *keywords* added to its type's."""
    return {_SCHEMA: {"description": description, **keywords} if description else keywords}


def _optional(attribute: attrs.Attribute[Any]) -> bool:
    """Whether the key is left out while None: the field defaults to None."""
    return attribute.default is None


def ref(shape: type[Shape]) -> dict[str, str]:
    """The ``$ref`` to *shape*'s component schema."""
    return {"$ref": f"#/components/schemas/{shape.__name__}"}


class Shape:
    """Base of the JSON bodies; subclasses are ``@attrs.frozen(kw_only=True)``."""

    __slots__ = ()
    # Declared for mypy (attrs.fields wants an attrs class); each subclass sets it.
    __attrs_attrs__: ClassVar[tuple[Any, ...]]

    closed: ClassVar[bool] = True
    """Whether the body has exactly its fields (``additionalProperties: false``)."""

    def to_json(self) -> dict[str, Any]:
        """The body as JSON-ready data."""
        body: dict[str, Any] = {}
        for name, dump, omit_none in _plan(type(self)):
            value = getattr(self, name)
            if value is not None:
                body[name] = dump(value)
            elif not omit_none:
                body[name] = None
        return body

    def response(
        self, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> JSONResponse:
        """A JSON response with this body."""
        return JSONResponse(self.to_json(), status_code=status_code, headers=headers)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema (Draft 2020-12, as OpenAPI 3.1 uses) of this body."""
        hints = get_type_hints(cls, include_extras=True)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for attribute in attrs.fields(cls):
            omit_none = _optional(attribute)
            hint = _without_none(hints[attribute.name]) if omit_none else hints[attribute.name]
            properties[attribute.name] = {
                **_schema_of(hint),
                **attribute.metadata.get(_SCHEMA, {}),
            }
            if not omit_none:
                required.append(attribute.name)
        schema: dict[str, Any] = {"type": "object"}
        if cls.__doc__:
            schema["description"] = " ".join(inspect.cleandoc(cls.__doc__).split("\n\n")[0].split())
        schema["required"] = required
        if cls.closed:
            schema["additionalProperties"] = False
        schema["properties"] = properties
        return schema


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _without_none(hint: Any) -> Any:
    if not _is_union(hint):
        return hint
    rest = [arg for arg in get_args(hint) if arg is not type(None)]
    if len(rest) != 1:
        raise TypeError(f"only X | None unions are supported, not {hint!r}")
    return rest[0]


def _encoded(hint: Any) -> Encoded | None:
    if get_origin(hint) is Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, Encoded)), None)
    return None


_SCALARS: Final[Mapping[type, str]] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
}


def _schema_of(hint: Any) -> dict[str, Any]:
    """The JSON Schema of one field type (see the table in the module docstring)."""
    if (encoded := _encoded(hint)) is not None:
        return dict(encoded.schema)
    origin = get_origin(hint)
    if _is_union(hint):
        inner = _schema_of(_without_none(hint))
        if isinstance(inner.get("type"), str):
            return {**inner, "type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    if origin is Literal:
        return {"type": "string", "enum": list(get_args(hint))}
    if origin is list:
        return {"type": "array", "items": _schema_of(get_args(hint)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(get_args(hint)[1])}
    if isinstance(hint, type):
        if issubclass(hint, Shape):
            return ref(hint)
        if issubclass(hint, enum.Enum):
            return {"type": "string", "enum": [member.value for member in hint]}
        if hint in _SCALARS:
            return {"type": _SCALARS[hint]}
    raise TypeError(f"no JSON Schema for the field type {hint!r}")


def _identity(value: Any) -> Any:
    return value


def _dumper(hint: Any) -> Callable[[Any], Any]:
    """How a (non-None) value of type *hint* is written to JSON."""
    if (encoded := _encoded(hint)) is not None:
        return encoded.dump or _identity
    if _is_union(hint):
        return _dumper(_without_none(hint))
    if get_origin(hint) is list:
        each = _dumper(get_args(hint)[0])
        return _identity if each is _identity else (lambda values: [each(v) for v in values])
    if isinstance(hint, type):
        if issubclass(hint, Shape):
            return Shape.to_json
        if issubclass(hint, enum.Enum):
            return _enum_value
    return _identity


def _enum_value(member: enum.Enum) -> Any:
    return member.value


_Plan = tuple[tuple[str, Callable[[Any], Any], bool], ...]
_PLANS: Final[dict[type[Shape], _Plan]] = {}


def _plan(cls: type[Shape]) -> _Plan:
    """Per field of *cls*: its name, its dumper and whether None leaves it out."""
    if (plan := _PLANS.get(cls)) is None:
        hints = get_type_hints(cls, include_extras=True)
        plan = tuple((a.name, _dumper(hints[a.name]), _optional(a)) for a in attrs.fields(cls))
        _PLANS[cls] = plan
    return plan
