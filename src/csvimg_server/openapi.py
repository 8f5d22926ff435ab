"""The OpenAPI 3.1 description of the csvimg HTTP API.

The operations (paths, parameters, status codes, descriptions) are written
by hand as plain data, so that the contract is read and reviewed as a
document; the schemas of the JSON bodies are not written here but derived
from the typed bodies the handlers send (`csvimg_server._bodies`), so a
body and its schema cannot drift apart. A test checks that every route of
the app is described here and validates real responses against these
schemas.

API keys are optional (``CSVIMG_API_KEYS``), so the document declares the
``apiKey`` bearer scheme as optional (``security: [{}, {"apiKey": []}]``)
and a 401 answer on every protected operation; `openapi_document` with
``api_keys=True`` (what a server with keys serves) makes it required. The
public operations (health checks, ``/metrics``, this document) have
``security: []``.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import csvimg_server._bodies as body
from csvimg_server._bodies import DEFAULT_PAGE, MAX_PAGE, SHAPES
from csvimg_server._shape import ref

__all__ = ["OPENAPI", "openapi_document"]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(ref(body.Error), description)


_REQUEST_ID: Final = {
    "name": "request_id",
    "in": "path",
    "required": True,
    "description": "The id `POST /api/v1/upload` returned (a UUID). "
    "A malformed or unknown id is a 404.",
    "schema": {"type": "string", "format": "uuid"},
}

_SCHEMAS: Final[dict[str, Any]] = {shape.__name__: shape.json_schema() for shape in SHAPES}
"""The components: derived from the bodies the handlers send (`csvimg_server._bodies`)."""

_NOT_FOUND: Final = _error("Unknown or malformed request id, or (with API keys) a request "
                           "another key created.")
_INTERNAL: Final = _error('Unexpected failure (`{"error": "internal error"}`) or a database '
                          'error (`{"error": "database error: ..."}`).')
_NOT_ALLOWED: Final = _error("Method not allowed for this path (an `Allow` header lists the "
                             "methods that are).")
_UNAUTHORIZED: Final = {
    **_error("API keys are on and the request has no `Authorization: Bearer <key>` header, or "
             "an unknown key. (Resources of another key are 404, not 401 or 403.)"),
    "headers": {
        "WWW-Authenticate": {
            "description": '`Bearer realm="csvimg"`, with `error="invalid_token"` for a '
            "wrong key.",
            "schema": {"type": "string"},
        }
    },
}
_PUBLIC: Final[list[Any]] = []
"""``security`` of an operation answered without a key."""

_PATHS: Final[dict[str, Any]] = {
    "/api/v1/upload": {
        "post": {
            "operationId": "upload",
            "summary": "Upload a CSV of products and image URLs",
            "description": "Validates the CSV (columns `S. No.`, `Product Name`, "
            "`Input Image Urls`; several URLs in one quoted cell, comma-separated), stores "
            "it and queues every image. The body is streamed: one over the configured limit "
            "(`CSVIMG_MAX_UPLOAD_BYTES`) is refused with 413 as soon as that is known.",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {
                                    "type": "string",
                                    "contentMediaType": "text/csv",
                                    "description": "The CSV file (UTF-8).",
                                },
                                "callback_url": {
                                    "type": "string",
                                    "format": "uri",
                                    "description": "http(s) URL that also receives this "
                                    "request's webhook events; must pass the SSRF guard.",
                                },
                                "quality": {
                                    "type": "integer",
                                    "minimum": 1,
                                    "maximum": 100,
                                    "description": "Output quality (default 50).",
                                },
                                "format": {
                                    "type": "string",
                                    "description": "Output format: JPEG (default), or "
                                    "WEBP/AVIF when this installation can write them.",
                                },
                                "max_dimension": {
                                    "type": "integer",
                                    "minimum": 1,
                                    "description": "Cap on the longer side, in pixels.",
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(ref(body.UploadAccepted), "Accepted: the request id."),
                "400": {
                    "description": "Invalid CSV (with the list of problems), missing `file` "
                    "field, a body that is not multipart/form-data, a refused `callback_url` "
                    "or a bad option.",
                    "content": {
                        "application/json": {
                            "schema": {"anyOf": [ref(body.ValidationError), ref(body.Error)]}
                        }
                    },
                },
                "405": _NOT_ALLOWED,
                "413": _error("The body is larger than the configured limit."),
                "500": _INTERNAL,
            },
        }
    },
    "/api/v1/status/{request_id}": {
        "get": {
            "operationId": "status",
            "summary": "Progress of a request",
            "parameters": [_REQUEST_ID],
            "responses": {
                "200": _json(ref(body.Status), "The request's status and counters."),
                "404": _NOT_FOUND,
                "405": _NOT_ALLOWED,
                "500": _INTERNAL,
            },
        }
    },
    "/api/v1/requests/{request_id}/items": {
        "get": {
            "operationId": "items",
            "summary": "Per-image results of a request, in CSV order",
            "parameters": [
                _REQUEST_ID,
                {
                    "name": "offset",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": 2**62,
                        "default": 0,
                    },
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_PAGE,
                        "default": DEFAULT_PAGE,
                    },
                },
            ],
            "responses": {
                "200": _json(ref(body.ItemPage), "One page of items."),
                "400": _error("offset or limit is not a whole number in range."),
                "404": _NOT_FOUND,
                "405": _NOT_ALLOWED,
                "500": _INTERNAL,
            },
        }
    },
    "/api/v1/requests/{request_id}/output.csv": {
        "get": {
            "operationId": "output_csv",
            "summary": "The output CSV of a finished request",
            "description": "The input rows, unchanged and in order, plus an "
            "`Output Image Urls` column holding one absolute URL per input URL (an empty "
            "entry for an image that failed). Cells that a spreadsheet would run as a "
            "formula are prefixed with `'`.",
            "parameters": [_REQUEST_ID],
            "responses": {
                "200": {
                    "description": "The CSV, as an attachment named `<upload-stem>-output.csv`.",
                    "headers": {
                        "Content-Disposition": {"schema": {"type": "string"}},
                    },
                    "content": {"text/csv": {"schema": {"type": "string"}}},
                },
                "404": _NOT_FOUND,
                "405": _NOT_ALLOWED,
                "409": _error("The request is still running (`status` says where it is)."),
                "500": _INTERNAL,
            },
        }
    },
    "/api/v1/requests/{request_id}/deliveries": {
        "get": {
            "operationId": "deliveries",
            "summary": "Webhook delivery attempts for a request, oldest first",
            "parameters": [_REQUEST_ID],
            "responses": {
                "200": _json(ref(body.Deliveries), "Every attempt made so far."),
                "404": _NOT_FOUND,
                "405": _NOT_ALLOWED,
                "500": _INTERNAL,
            },
        }
    },
    "/api/v1/images/{key}": {
        "get": {
            "operationId": "image",
            "summary": "An output image",
            "description": "The URLs in the output CSV and the items point here. Images "
            "never change, so they are cacheable for a year (`Cache-Control: public`, or "
            "`private` when API keys are on: then only the key that created the request "
            "sees them); `If-None-Match` is honoured.",
            "parameters": [
                {
                    "name": "key",
                    "in": "path",
                    "required": True,
                    "description": "`<request_id>/<n>.<ext>` (may contain `/`).",
                    "schema": {"type": "string"},
                },
                {
                    "name": "If-None-Match",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "200": {
                    "description": "The image bytes.",
                    "headers": {
                        "ETag": {"schema": {"type": "string"}},
                        "Cache-Control": {"schema": {"type": "string"}},
                    },
                    "content": {
                        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                        "image/webp": {"schema": {"type": "string", "format": "binary"}},
                        "image/avif": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "304": {"description": "Not modified (the ETag matched)."},
                "404": _error("No such image (or, with API keys, one of another key)."),
                "405": _NOT_ALLOWED,
                "500": _INTERNAL,
            },
        }
    },
    "/api/v1/webhook": {
        "post": {
            "operationId": "add_webhook",
            "summary": "Register a webhook receiver",
            "description": "The receiver gets `request.completed` and `request.failed` events "
            "signed per the Standard Webhooks specification (headers `webhook-id`, "
            "`webhook-timestamp`, `webhook-signature`) with the returned secret.",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref(body.WebhookRequest)}},
            },
            "responses": {
                "200": _json(ref(body.WebhookRegistered), "Registered; keep the secret."),
                "400": _error("Bad JSON, a missing or non-http(s) URL, or an address the "
                              "SSRF guard refuses."),
                "405": _NOT_ALLOWED,
                "413": _error("The JSON body is too large."),
                "500": _INTERNAL,
            },
        },
        "get": {
            "operationId": "list_webhooks",
            "summary": "List webhook registrations (without their secrets)",
            "responses": {
                "200": _json(ref(body.Webhooks), "Every registration."),
                "405": _NOT_ALLOWED,
                "500": _INTERNAL,
            },
        },
    },
    "/api/v1/webhook/{webhook_id}": {
        "delete": {
            "operationId": "delete_webhook",
            "summary": "Delete a webhook registration",
            "parameters": [
                {
                    "name": "webhook_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
            "responses": {
                "200": _json(ref(body.WebhookDeleted), "Deleted."),
                "404": _error("No such registration."),
                "405": _NOT_ALLOWED,
                "500": _INTERNAL,
            },
        }
    },
    "/": {
        "get": {
            "operationId": "uploadPage",
            "summary": "The browser upload page (HTML; its assets are under /static/)",
            "security": _PUBLIC,
            "responses": {
                "200": {
                    "description": "The page.",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: the process answers",
            "security": _PUBLIC,
            "responses": {"200": _json(ref(body.Health), "Alive.")},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: storage and queue answer",
            "security": _PUBLIC,
            "responses": {
                "200": _json(ref(body.Readiness), "Ready."),
                "503": _json(ref(body.Readiness), "Storage or queue unreachable."),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "description": "The Prometheus text format: requests and items by status, "
            "fetch and codec latency histograms, queue depth, webhook delivery outcomes "
            "and HTTP requests by route. Public even when API keys are on (it holds no "
            "request data, only counts): restrict it at the network if that matters.",
            "security": _PUBLIC,
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "405": _NOT_ALLOWED,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": _PUBLIC,
            "responses": {
                "200": {
                    "description": "The OpenAPI document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
}


def _with_unauthorized(paths: dict[str, Any]) -> dict[str, Any]:
    """Add the 401 answer to every operation that is not public."""
    for operations in paths.values():
        for operation in operations.values():
            if operation.get("security") != _PUBLIC:
                operation["responses"]["401"] = _UNAUTHORIZED
    return paths


OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "csvimg",
        "version": "1",
        "summary": "Bulk image compression driven by a CSV.",
        "description": "Upload a CSV of products whose cells list image URLs; every image "
        "is downloaded and compressed in the background; poll the status (or receive a "
        "signed webhook) and download an output CSV with the compressed images' URLs. "
        "Every error is JSON: `{\"error\": \"...\"}`; an unknown path is a 404 and a wrong "
        "method a 405, both in that shape. When the server has API keys "
        "(`CSVIMG_API_KEYS`), every operation but the health checks, `/metrics` and this "
        "document needs `Authorization: Bearer <key>` (401 otherwise, unknown paths "
        "included), and a request and everything about it is visible only to the key that "
        "created it (404 for the others).",
    },
    "security": [{}, {"apiKey": []}],
    "paths": _with_unauthorized(_PATHS),
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the keys in `CSVIMG_API_KEYS`, when the server has any.",
            }
        },
    },
}
"""The document, without ``servers`` (see `openapi_document`)."""


def openapi_document(server_url: str | None = None, *, api_keys: bool = False) -> dict[str, Any]:
    """Return a fresh copy of the document, with *server_url* as its server.

    With *api_keys* the bearer key is required rather than optional.
    """
    document = copy.deepcopy(OPENAPI)
    if server_url:
        document["servers"] = [{"url": server_url}]
    if api_keys:
        document["security"] = [{"apiKey": []}]
    return document
