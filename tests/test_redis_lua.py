"""The Lua scripts of the Redis backends, read from files, are the scripts of before.

Until the Redis backend became a package its scripts were Python string
constants in ``csvimg/backends/redis.py`` (a helper such as
``committed_request`` was prepended with ``+``). `EXPECTED` freezes the
SHA1 of each of those strings, computed from that module: the text the
server receives (and so the SHA1 it caches for EVALSHA) must not change
with the layout. A change to a script is a change of behaviour: update
its hash here in the same commit, on purpose.

No Redis server is needed: the texts are read as the backends read them.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest

redis = pytest.importorskip("redis", reason="the Redis backend needs redis-py (csvimg[redis])")

from csvimg.backends.redis import _base, _lua, queue  # noqa: E402

EXPECTED = {
    # RedisStorage: the name it calls a script by -> SHA1 of the text (old constant)
    "reserve": "6539daf1f8638f50492aad4d0e696581c827a7d5",  # _RESERVE
    "write_rows": "ed4752ec1a051bd0be2ea7e3fef7820b3d5427ca",  # _WRITE_ROWS
    "write_items": "9a62521674934561189eeba3e89db50a7ef5a8f5",  # _WRITE_ITEMS
    "commit": "31929a5f3bbc5e5bbb35ee3d14a460d7861f640d",  # _COMMIT
    "discard": "50835125128c462e4d315b2e32eeb190f08f3427",  # _DISCARD
    "get_item": "dd92695347d2d3694f12b22c65ad1ea3356f026f",  # _COMMITTED + _GET_ITEM
    "start": "0009eb6a00c6c94a41a10597a760c527cf8b68ae",  # _COMMITTED + _START_ITEM
    "extend": "f07b90b0ce7ea144816cbfa3473bf772a4145acd",  # _COMMITTED + _EXTEND_LEASE
    "finish": "4d3342d68e7a9415b7ed61cf7d5072e591f8eace",  # _COMMITTED + _FINISH_ITEM
    "stale": "494d150d2271b5b6e6f252c359dc8d31ccb56cc7",  # _STALE_ITEMS
    "claim_events": "0ae421cedb87775b016287f7dda8faf7f7f854d9",  # _CLAIM_EVENTS
    "reschedule": "048cba83c17259267955294c641febe2bc78cdb8",  # _RESCHEDULE_EVENT
    "add_webhook": "f3c24c0be54db78166fed340830d4b8d87ad7e93",  # _OWNER_INDEX + _ADD_WEBHOOK
    "delete_webhook": "4acfd2dfe5119a93d3269bae4b394d52753b139d",  # _DELETE_WEBHOOK
    "webhook_active": "0d7c699ad50b7d81a04ced559d834296a128c4b8",  # _SET_WEBHOOK_ACTIVE
    # RedisQueue
    "queue_claim": "38dc62ca62efc7ed192fe3744c13fd366eafddef",  # _QUEUE_CLAIM
    "queue_ack": "7a9ce89263e1c8539841e0081ce52040536a7a07",  # _QUEUE_HOLDS + _QUEUE_ACK
    "queue_release": "d506702c3552bcf66eb1d4561d2e189e1d0cbb68",  # _QUEUE_HOLDS + _QUEUE_RELEASE
    "queue_extend": "5f8b74661600e45304e33c713b7a2670ff0c9da5",  # _QUEUE_HOLDS + _QUEUE_EXTEND
}


def loaded() -> dict[str, str]:
    """Every script the backends register, by the names of `EXPECTED`."""
    found = dict(_base._SCRIPTS)
    assert len(found) == len(_base._SCRIPTS), "two storage scripts share a name"
    found |= {
        "queue_claim": queue._CLAIM,
        "queue_ack": queue._ACK,
        "queue_release": queue._RELEASE,
        "queue_extend": queue._EXTEND,
    }
    return found


def test_every_script_is_checked() -> None:
    assert set(loaded()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_script_text_is_unchanged(name: str) -> None:
    text = loaded()[name]
    assert hashlib.sha1(text.encode("utf-8")).hexdigest() == EXPECTED[name]


def test_redis_py_sends_the_same_text() -> None:
    client = redis.Redis()  # never connects: register_script only hashes
    for name, text in loaded().items():
        assert client.register_script(text).sha == EXPECTED[name], name


def test_every_lua_file_is_used() -> None:
    folder = resources.files(_lua.PACKAGE).joinpath("lua")
    files = {f.name.removesuffix(".lua") for f in folder.iterdir() if f.name.endswith(".lua")}
    texts = loaded().values()
    for name in files:
        part = _lua._read(name)
        assert any(part in text for text in texts), f"lua/{name}.lua is not used"
