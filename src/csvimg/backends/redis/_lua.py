"""The Lua scripts of the Redis backends, read from ``lua/*.lua``.

Each script runs atomically on the server. Times arrive as strings (ARGV)
and are only compared (tonumber) or stored as they came.

redis-py sends a command again when the connection breaks, even if the
first one ran: the write scripts recognise their own replay (by a token,
or by how far a list has grown) and answer as the first run did.

Files whose name starts with ``_`` are helpers that a script needs
prepended (Redis has no ``require``):

* ``_committed.lua``: ``committed_request``, for the item scripts: an item
  is visible only once its request is committed (``create_request``
  writes the request hash last);
* ``_owner_index.lua``: ``owner_index``, the index key of a webhook's owner;
* ``_queue_holds.lua``: ``holds``, whether a queue token still names the
  entry's current hand-out.

`script` joins helpers and script with a newline before each part, which
is how the text was laid out when it lived in Python strings: the text the
server receives, and so its SHA1 for EVALSHA, is unchanged (see
``tests/test_redis_lua.py``).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final

PACKAGE: Final = "csvimg.backends.redis"
"""The package whose ``lua`` folder holds the scripts."""


@functools.cache
def _read(name: str) -> str:
    return resources.files(PACKAGE).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def script(name: str, *helpers: str) -> str:
    """The text of ``lua/<name>.lua`` with the *helpers* (``_committed``...) before it."""
    return "".join(f"\n{_read(part)}" for part in (*helpers, name))
