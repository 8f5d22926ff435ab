"""The JSON bodies of the HTTP API and the schemas derived from them.

Each body is declared once (`csvimg_server._bodies`); `/openapi.json`
lists the schema derived from its fields. These check the derivation
itself: a body built in Python validates against its own schema, optional
keys are left out, and every ``$ref`` in the document has its component.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from csvimg.jobs import ItemStatus, RequestStatus
from csvimg_server import _bodies as body
from csvimg_server._shape import Shape, iso_time
from csvimg_server.openapi import OPENAPI
from server_helpers import validate

_ID = "0b7c6a49-3a2e-4c8c-9f0e-4b1f3c0d9a11"

EXAMPLES: list[Shape] = [
    body.Error(error="not found"),
    body.Error(error="not ready", status=RequestStatus.PROCESSING),
    body.ValidationError(
        error="2 problems",
        errors=[
            body.Problem(row=None, column=None, code="empty", message="no rows"),
            body.Problem(row=3, column="S. No.", code="bad-serial", message="row 3"),
        ],
    ),
    body.UploadAccepted(request_id=_ID, status_url="http://h/api/v1/status/" + _ID),
    body.UploadAccepted(
        request_id=_ID, status_url="http://h/api/v1/status/" + _ID, callback_secret="whsec_x"
    ),
    body.Status(
        request_id=_ID,
        status=RequestStatus.COMPLETED,
        progress=body.Progress(total=2, done=1, failed=1),
        created_at=0.0,
        updated_at=1.5,
        output_csv_url="http://h/out.csv",
    ),
    body.ItemPage(
        request_id=_ID,
        offset=0,
        limit=body.MAX_PAGE,
        total=1,
        items=[
            body.Item(
                row=0, position=0, input_url="http://img/a.png", output_url=None,
                status=ItemStatus.FAILED, bytes_in=None, bytes_out=None, width=None,
                height=None, attempts=3, error_code="http-404", error_message="Not Found",
            )
        ],
        next=None,
    ),
    body.Deliveries(
        request_id=_ID,
        deliveries=[
            body.Delivery(
                event_id="evt_1", url="http://r/", attempt=1, at=2.0, status_code=None,
                error="timeout",
            )
        ],
    ),
    body.WebhookRegistered(
        message="Webhook registered successfully.", id="wh_1", secret="whsec_y",
        callback_url="https://r/",
    ),
    body.Webhooks(
        webhooks=[body.Webhook(id="wh_1", callback_url="https://r/", active=True, created_at=0)]
    ),
    body.WebhookDeleted(message="Webhook deleted.", id="wh_1"),
    body.Health(status="ok"),
    body.Readiness(status="unavailable", checks={"storage": "ok", "queue": "error: down"}),
]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: type(e).__name__)
def test_body_validates_against_its_own_schema(example: Shape) -> None:
    schema = OPENAPI["components"]["schemas"][type(example).__name__]
    assert schema == type(example).json_schema()
    validate(example.to_json(), schema, OPENAPI)


@pytest.mark.parametrize("shape", body.SHAPES, ids=lambda s: s.__name__)
def test_schema_lists_every_field(shape: type[Shape]) -> None:
    schema = shape.json_schema()
    names = [a.name for a in attrs.fields(shape)]
    assert list(schema["properties"]) == names
    assert set(schema["required"]) <= set(names)
    assert schema["description"], f"{shape.__name__} needs a docstring"


def test_optional_key_is_left_out_while_none() -> None:
    accepted = body.UploadAccepted(request_id=_ID, status_url="http://h/s")
    assert accepted.to_json() == {"request_id": _ID, "status_url": "http://h/s"}
    assert "callback_secret" not in body.UploadAccepted.json_schema()["required"]
    assert body.Error(error="x").to_json() == {"error": "x"}


def test_values_are_written_as_json() -> None:
    status = body.Status(
        request_id=_ID, status=RequestStatus.PENDING,
        progress=body.Progress(total=0, done=0, failed=0),
        created_at=0.0, updated_at=0.0, output_csv_url=None,
    ).to_json()
    assert status["status"] == "PENDING" and type(status["status"]) is str
    assert status["created_at"] == iso_time(0.0) == "1970-01-01T00:00:00Z"
    assert status["progress"] == {"total": 0, "done": 0, "failed": 0}
    assert status["output_csv_url"] is None


def test_every_ref_has_its_component() -> None:
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(OPENAPI)
    assert refs <= set(OPENAPI["components"]["schemas"])
    assert set(OPENAPI["components"]["schemas"]) == {s.__name__ for s in body.SHAPES}


def test_unsupported_field_type_is_refused() -> None:
    @attrs.frozen(kw_only=True)
    class Odd(Shape):
        """A body with a field type the derivation does not know."""

        when: bytes

    with pytest.raises(TypeError, match="no JSON Schema"):
        Odd.json_schema()
