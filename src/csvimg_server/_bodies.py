"""The JSON bodies of the HTTP API, each declared once.

The handlers build these and send `Shape.to_json`; ``/openapi.json`` lists
`Shape.json_schema` of each under its class name (`SHAPES`, in the order
the reference page shows them). See `csvimg_server._shape` for how a field
type becomes a schema.
"""

from __future__ import annotations

from typing import ClassVar, Final, Literal

import attrs

from csvimg.jobs import ItemStatus, RequestStatus
from csvimg_server._shape import Shape, Timestamp, Uri, Uuid, schema

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "SHAPES",
    "Deliveries",
    "Delivery",
    "Error",
    "Health",
    "Item",
    "ItemPage",
    "Problem",
    "Progress",
    "Readiness",
    "Status",
    "UploadAccepted",
    "ValidationError",
    "Webhook",
    "WebhookDeleted",
    "WebhookRegistered",
    "WebhookRequest",
    "Webhooks",
]

DEFAULT_PAGE: Final = 100
"""The ``limit`` of a page of items when the query gives none."""
MAX_PAGE: Final = 1000
"""The largest ``limit`` of one page of items."""

_COUNT: Final = schema(minimum=0)


@attrs.frozen(kw_only=True)
class Error(Shape):
    """Every error answer: a message for people, sometimes more detail."""

    # Open: a later version may add detail to an error without breaking
    # clients that validate against this schema.
    closed: ClassVar[bool] = False

    error: str
    status: RequestStatus | None = attrs.field(
        default=None, metadata=schema("The request status (409 only).")
    )


@attrs.frozen(kw_only=True)
class Problem(Shape):
    """One thing wrong with an uploaded CSV."""

    row: int | None = attrs.field(
        metadata=schema(
            "Row number as a spreadsheet shows it (header = 1); "
            "null for a problem of the whole file."
        )
    )
    column: str | None = attrs.field(metadata=schema("The column's header text, or null."))
    code: str = attrs.field(
        metadata=schema(
            "Stable machine-readable code, e.g. `missing-column`, `bad-url`, "
            "`duplicate-serial`, `too-large`."
        )
    )
    message: str


@attrs.frozen(kw_only=True)
class ValidationError(Shape):
    """The CSV was rejected; `errors` lists every problem found."""

    error: str
    errors: list[Problem]


@attrs.frozen(kw_only=True)
class UploadAccepted(Shape):
    """An upload was accepted: where to follow it."""

    request_id: Uuid
    status_url: Uri
    callback_secret: str | None = attrs.field(
        default=None,
        metadata=schema(
            "Only with a `callback_url`: the Standard Webhooks secret that signs this "
            "request's events to it. Shown only here.",
            pattern="^whsec_",
        ),
    )


@attrs.frozen(kw_only=True)
class Progress(Shape):
    """How many of a request's images are done or failed."""

    total: int = attrs.field(metadata=_COUNT)
    done: int = attrs.field(metadata=_COUNT)
    failed: int = attrs.field(metadata=_COUNT)


@attrs.frozen(kw_only=True)
class Status(Shape):
    """Where a request is, and its counters."""

    request_id: Uuid
    status: RequestStatus = attrs.field(
        metadata=schema(
            "COMPLETED: every image was tried (some may have failed, see progress and the "
            "items); FAILED: every image failed."
        )
    )
    progress: Progress
    created_at: Timestamp
    updated_at: Timestamp
    output_csv_url: Uri | None = attrs.field(
        metadata=schema("Absolute URL of the output CSV; null until the request finished.")
    )


@attrs.frozen(kw_only=True)
class Item(Shape):
    """One image URL of one row and what became of it."""

    row: int = attrs.field(
        metadata=schema("0-based index of the product row among the data rows.", minimum=0)
    )
    position: int = attrs.field(
        metadata=schema("0-based position of the URL inside its cell.", minimum=0)
    )
    input_url: str
    output_url: str | None = attrs.field(
        metadata=schema("Absolute URL of the compressed image; null unless DONE.")
    )
    status: ItemStatus
    bytes_in: int | None
    bytes_out: int | None
    width: int | None
    height: int | None
    attempts: int = attrs.field(metadata=_COUNT)
    error_code: str | None = attrs.field(
        metadata=schema(
            "Stable code, e.g. `http-404`, `timeout`, `blocked-address`, `not-an-image`, "
            "`too-large`."
        )
    )
    error_message: str | None


@attrs.frozen(kw_only=True)
class ItemPage(Shape):
    """One page of a request's items, in CSV order."""

    request_id: Uuid
    offset: int = attrs.field(metadata=_COUNT)
    limit: int = attrs.field(metadata=schema(minimum=1, maximum=MAX_PAGE))
    total: int = attrs.field(metadata=_COUNT)
    items: list[Item]
    next: Uri | None = attrs.field(
        metadata=schema("URL of the next page; null on the last one.")
    )


@attrs.frozen(kw_only=True)
class Delivery(Shape):
    """One attempt to deliver a webhook event to one receiver."""

    event_id: str = attrs.field(metadata=schema("The `webhook-id` header sent."))
    url: str
    attempt: int = attrs.field(metadata=schema(minimum=1))
    at: Timestamp
    status_code: int | None
    error: str | None


@attrs.frozen(kw_only=True)
class Deliveries(Shape):
    """Every webhook delivery attempt of a request, oldest first."""

    request_id: Uuid
    deliveries: list[Delivery]


@attrs.frozen(kw_only=True)
class WebhookRequest(Shape):
    """The body of `POST /api/v1/webhook`."""

    # A request body: keys this version does not know are ignored.
    closed: ClassVar[bool] = False

    callback_url: Uri


@attrs.frozen(kw_only=True)
class WebhookRegistered(Shape):
    """A webhook was registered: its id and its signing secret."""

    message: Literal["Webhook registered successfully."]
    id: str
    secret: str = attrs.field(
        metadata=schema(
            "The Standard Webhooks signing secret; shown only here, once.", pattern="^whsec_"
        )
    )
    callback_url: Uri


@attrs.frozen(kw_only=True)
class Webhook(Shape):
    """One webhook registration, without its secret."""

    id: str
    callback_url: str
    active: bool = attrs.field(metadata=schema("False once a receiver answered 410 Gone."))
    created_at: Timestamp


@attrs.frozen(kw_only=True)
class Webhooks(Shape):
    """The caller's webhook registrations."""

    webhooks: list[Webhook]


@attrs.frozen(kw_only=True)
class WebhookDeleted(Shape):
    """A webhook registration was deleted."""

    message: Literal["Webhook deleted."]
    id: str


@attrs.frozen(kw_only=True)
class Health(Shape):
    """The process answers."""

    status: Literal["ok"]


@attrs.frozen(kw_only=True)
class Readiness(Shape):
    """Whether storage and queue answer."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = attrs.field(
        metadata=schema('`"ok"` or `"error: ..."` for `storage` and `queue`.')
    )


SHAPES: Final[tuple[type[Shape], ...]] = (
    Error,
    Problem,
    ValidationError,
    UploadAccepted,
    Progress,
    Status,
    Item,
    ItemPage,
    Delivery,
    Deliveries,
    WebhookRequest,
    WebhookRegistered,
    Webhook,
    Webhooks,
    WebhookDeleted,
    Health,
    Readiness,
)
"""Every body, in the order of the document's ``components.schemas``."""
