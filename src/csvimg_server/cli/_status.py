"""``csvimg status``: ask a running server about a request (``--watch``: until done)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from csvimg_server.cli._env import env_value
from csvimg_server.cli._errors import EXIT_FAILED, EXIT_OK, UsageError
from csvimg_server.cli._status_view import print_status, watch

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_SERVER", "STATUS_INTERVAL", "add_status_parser", "cmd_status"]

DEFAULT_SERVER: Final = "http://127.0.0.1:8000"
STATUS_INTERVAL: Final = 1.0
"""Seconds between polls of ``csvimg status --watch``."""

_EXAMPLES = """\
examples:
  csvimg status 6f1c2a7e-0d1b-4c39-9a43-5b1f3f0e2a11
  csvimg status 6f1c2a7e-0d1b-4c39-9a43-5b1f3f0e2a11 --watch
      a progress bar until the request finished, then the status
  csvimg status 6f1c2a7e-0d1b-4c39-9a43-5b1f3f0e2a11 --server http://img.internal:8000 --json
  CSVIMG_API_KEY=... csvimg status 6f1c2a7e-0d1b-4c39-9a43-5b1f3f0e2a11
      a server with API keys (or --api-key KEY; the env keeps it out of 'ps')

exit status: 0 when the status was read (with --watch: when the request
COMPLETED), 1 when it could not be read or (with --watch) every image FAILED.
"""


def add_status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``status`` subcommand to *sub*."""
    status = sub.add_parser(
        "status", help="show a request's status from a running server",
        description="Print the status of a request from a running csvimg server:\n"
                    "progress, times and the output CSV's URL.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("request_id", metavar="ID", help="the request id")
    status.add_argument("--server", metavar="URL",
                        help=f"server base URL (env CSVIMG_SERVER; default {DEFAULT_SERVER})")
    status.add_argument("--api-key", metavar="KEY",
                        help="send 'Authorization: Bearer KEY' (env CSVIMG_API_KEY)")
    status.add_argument("--watch", action="store_true",
                        help="poll until the request finished, showing its progress")
    status.add_argument("--interval", type=float, default=STATUS_INTERVAL, metavar="SECONDS",
                        help=f"seconds between polls with --watch (default {STATUS_INTERVAL:g})")
    status.add_argument("--json", action="store_true", help="print the raw JSON answer")
    status.set_defaults(func=cmd_status)


class _StatusError(Exception):
    """The status could not be had: print the message, exit 1."""


def _fetch_status(client: httpx.Client, url: str, server: str, *, keyed: bool) -> dict[str, Any]:
    import httpx

    try:
        response = client.get(url)
    except httpx.HTTPError as exc:
        raise _StatusError(f"cannot reach {server}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"error": response.text[:200]}
    if response.status_code == 200:
        return body
    message = body.get("error", body)
    if response.status_code == 401:
        hint = ("the server refused the API key" if keyed else
                "the server needs an API key: pass --api-key or set CSVIMG_API_KEY")
        raise _StatusError(f"401: {hint} ({message})")
    raise _StatusError(f"{response.status_code}: {message}")


def cmd_status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``csvimg status``: ask a running server about a request (``--watch``: until done)."""
    import httpx

    # `or`, not option_or_env: an empty --server/--api-key means "not given".
    server = (args.server or env_value(env, "CSVIMG_SERVER") or DEFAULT_SERVER).rstrip("/")
    url = f"{server}/api/v1/status/{quote(args.request_id, safe='')}"
    key = args.api_key or env_value(env, "CSVIMG_API_KEY")
    if args.interval <= 0:
        raise UsageError(f"--interval must be positive, not {args.interval:g}")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    keyed = key is not None
    try:
        with httpx.Client(timeout=10.0, headers=headers) as client:
            body = _fetch_status(client, url, server, keyed=keyed)
            if args.watch:
                # With --json, stdout is kept for the JSON alone.
                body = watch(body, lambda: _fetch_status(client, url, server, keyed=keyed),
                             interval=args.interval,
                             stream=sys.stderr if args.json else sys.stdout)
    except _StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print_status(body, sys.stdout)
    if args.watch and body.get("status") == "FAILED":
        return EXIT_FAILED
    return EXIT_OK
