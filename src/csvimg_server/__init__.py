"""csvimg_server: the reference HTTP server and the ``csvimg`` command.

`create_app` builds the Starlette application around a `csvimg.Engine`;
``csvimg serve`` runs it under uvicorn with in-process workers, and the
other ``csvimg`` commands (``worker``, ``process``, ``validate``,
``status``) live in `csvimg_server.cli`.
"""

from __future__ import annotations

from csvimg_server.app import create_app

__all__ = ["create_app"]
