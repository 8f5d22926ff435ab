"""`BlobStoreContract`: the executable contract of a `BlobStore`."""

from __future__ import annotations

import anyio
import pytest

from csvimg._errors import NotFoundError
from csvimg.backends import BlobStore
from csvimg.testing._helpers import (
    _AnyioContract,
)

HOSTILE_KEYS: tuple[str, ...] = (
    "",
    "/",
    "/etc/passwd",
    "../x",
    "..",
    ".",
    "a/../../x",
    "a/..",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\x",
    "C:\\x",
    "a\x00b",
)
"""Blob keys every blob store must refuse with `ValueError`."""


class BlobStoreContract(_AnyioContract):
    """The `BlobStore` contract; a subclass provides the ``blobs`` fixture.

    The fixture yields a fresh, empty, opened store for each test.
    """

    async def test_put_get_stat(self, blobs: BlobStore) -> None:
        """What was put is read back; stat describes it."""
        data = bytes(range(256)) * 40
        info = await blobs.put("req/0.jpg", data, content_type="image/jpeg")
        assert (info.key, info.size, info.content_type) == ("req/0.jpg", len(data), "image/jpeg")
        assert info.etag
        assert await blobs.get("req/0.jpg") == data
        stat = await blobs.stat("req/0.jpg")
        assert stat is not None
        assert (stat.key, stat.size, stat.content_type, stat.etag) == (
            info.key, info.size, info.content_type, info.etag,
        )

    async def test_content_types(self, blobs: BlobStore) -> None:
        """Each blob keeps the content type it was stored with."""
        await blobs.put("r/1.webp", b"RIFF....WEBP", content_type="image/webp")
        await blobs.put("r/2.png", b"\x89PNG", content_type="image/png")
        one, two = await blobs.stat("r/1.webp"), await blobs.stat("r/2.png")
        assert one is not None
        assert two is not None
        assert (one.content_type, two.content_type) == ("image/webp", "image/png")

    async def test_empty_blob(self, blobs: BlobStore) -> None:
        """Zero bytes is a blob too."""
        info = await blobs.put("empty.jpg", b"", content_type="image/jpeg")
        assert info.size == 0
        assert await blobs.get("empty.jpg") == b""

    async def test_etag_follows_content(self, blobs: BlobStore) -> None:
        """Same bytes, same etag (even under another key); other bytes, other etag."""
        a = await blobs.put("x/a.jpg", b"one", content_type="image/jpeg")
        again = await blobs.put("x/a.jpg", b"one", content_type="image/jpeg")
        elsewhere = await blobs.put("y/b.jpg", b"one", content_type="image/jpeg")
        assert a.etag == again.etag == elsewhere.etag
        changed = await blobs.put("x/a.jpg", b"two", content_type="image/jpeg")
        assert changed.etag != a.etag
        stat = await blobs.stat("x/a.jpg")
        assert stat is not None
        assert stat.etag == changed.etag
        stat_again = await blobs.stat("x/a.jpg")
        assert stat_again is not None
        assert stat_again.etag == changed.etag

    async def test_overwrite(self, blobs: BlobStore) -> None:
        """A second put replaces the first entirely."""
        await blobs.put("k.jpg", b"a" * 5000, content_type="image/jpeg")
        info = await blobs.put("k.jpg", b"b" * 10, content_type="image/jpeg")
        assert await blobs.get("k.jpg") == b"b" * 10
        stat = await blobs.stat("k.jpg")
        assert stat is not None
        assert stat.size == info.size == 10

    async def test_missing(self, blobs: BlobStore) -> None:
        """A missing blob: `NotFoundError` (a `KeyError`) from get, None from stat."""
        with pytest.raises(NotFoundError):
            await blobs.get("nope/0.jpg")
        with pytest.raises(KeyError):
            await blobs.get("nope.jpg")
        assert await blobs.stat("nope/0.jpg") is None
        await blobs.delete("nope/0.jpg")  # missing is fine

    async def test_delete(self, blobs: BlobStore) -> None:
        """Deleted blobs are gone; their neighbours stay."""
        await blobs.put("d/1.jpg", b"1", content_type="image/jpeg")
        await blobs.put("d/2.jpg", b"2", content_type="image/jpeg")
        await blobs.delete("d/1.jpg")
        assert await blobs.stat("d/1.jpg") is None
        with pytest.raises(NotFoundError):
            await blobs.get("d/1.jpg")
        assert await blobs.get("d/2.jpg") == b"2"
        await blobs.delete("d/1.jpg")

    async def test_nested_keys(self, blobs: BlobStore) -> None:
        """Keys with ``/`` nest; a key's prefix is not itself a blob."""
        keys = ["a/b/c.jpg", "a/b/d.jpg", "a/x.png", "top.jpg", "a/b/c/deeper.jpg"]
        for n, key in enumerate(keys):
            await blobs.put(key, key.encode() * (n + 1), content_type="image/jpeg")
        for n, key in enumerate(keys):
            assert await blobs.get(key) == key.encode() * (n + 1)
        assert await blobs.stat("a/b") is None
        with pytest.raises(NotFoundError):
            await blobs.get("a")

    @pytest.mark.parametrize("key", HOSTILE_KEYS)
    async def test_hostile_keys_are_refused(self, blobs: BlobStore, key: str) -> None:
        """Keys that could escape the store raise `ValueError` on every method."""
        with pytest.raises(ValueError, match="key"):
            await blobs.put(key, b"x", content_type="image/jpeg")
        with pytest.raises(ValueError, match="key"):
            await blobs.get(key)
        with pytest.raises(ValueError, match="key"):
            await blobs.stat(key)
        with pytest.raises(ValueError, match="key"):
            await blobs.delete(key)

    async def test_put_is_atomic(self, blobs: BlobStore) -> None:
        """Readers racing writers see one whole blob or another, never a mix."""
        payloads = (b"a" * 300_000, b"b" * 200_001)
        await blobs.put("race.jpg", payloads[0], content_type="image/jpeg")
        seen: list[bytes] = []

        async def write(data: bytes) -> None:
            for _ in range(15):
                await blobs.put("race.jpg", data, content_type="image/jpeg")

        async def read() -> None:
            for _ in range(30):
                seen.append(await blobs.get("race.jpg"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(write, payloads[0])
            tg.start_soon(write, payloads[1])
            tg.start_soon(read)
            tg.start_soon(read)
        assert all(data in payloads for data in seen)
        assert await blobs.get("race.jpg") in payloads
