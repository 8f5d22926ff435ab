"""The folder blob store: what the contract suite cannot see.

Files on disk, temporary files, failing filesystems, etags across
processes, URL parsing, keys that try to escape.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from csvimg._errors import ConfigError, NotFoundError, StorageError
from csvimg.backends.files import FileBlobStore, check_key, parse_file_url
from csvimg.plugins import Plugins
from csvimg.settings import Settings
from csvimg.testing import HOSTILE_KEYS

pytestmark = pytest.mark.anyio


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
async def blobs(root: Path) -> AsyncIterator[FileBlobStore]:
    store = FileBlobStore(root)
    await store.open()
    yield store
    await store.close()


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


# -- URLs --------------------------------------------------------------------


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_file_url("file:///srv/blobs") == (Path("/srv/blobs"), False)
    assert parse_file_url("file://localhost/srv/blobs") == (Path("/srv/blobs"), False)
    assert parse_file_url("file:///srv/my%20blobs?fsync=1") == (Path("/srv/my blobs"), True)
    assert parse_file_url("file:out/blobs") == (tmp_path / "out" / "blobs", False)
    assert parse_file_url("file://./out") == (tmp_path / "out", False)
    assert parse_file_url("FILE:///x?fsync=false") == (Path("/x"), False)


@pytest.mark.parametrize(
    "url",
    ["file:", "file://", "file:///x?mode=1", "file:///x?fsync=maybe", "http://x/y", "blobs"],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_file_url(url)


def test_registered_for_blobs(root: Path) -> None:
    store = Plugins(load_entrypoints=False).blobs(f"file://{root}", Settings())
    assert isinstance(store, FileBlobStore)
    assert store.root == root


# -- keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["a", "req/0.jpg", "a.b/c..d.jpg", "..a/b..", "é/ü ☕.jpg", "x" * 255, "a:b/c"]
)
def test_good_keys(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", [*HOSTILE_KEYS, "x" * 256, "a/" * 600 + "b"])
def test_bad_keys(key: str) -> None:
    with pytest.raises(ValueError, match="bad blob key"):
        check_key(key)


async def test_escapes_write_nothing_outside(blobs: FileBlobStore, tmp_path: Path) -> None:
    for key in ("../escaped.jpg", "a/../../escaped.jpg", str(tmp_path / "escaped.jpg")):
        with pytest.raises(ValueError, match="bad blob key"):
            await blobs.put(key, b"x", content_type="image/jpeg")
    assert _all_files(tmp_path) == []


# -- files on disk ---------------------------------------------------------------


async def test_put_writes_a_plain_file(blobs: FileBlobStore, root: Path) -> None:
    info = await blobs.put("req/3.jpg", b"jpeg bytes", content_type="image/jpeg")
    assert info.path == root / "req" / "3.jpg"
    assert info.path.read_bytes() == b"jpeg bytes"
    stat = await blobs.stat("req/3.jpg")
    assert stat is not None
    assert stat.path == info.path
    umask = os.umask(0)
    os.umask(umask)
    assert info.path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _all_files(root) == ["req/3.jpg"]


async def test_fsync_mode(root: Path) -> None:
    store = FileBlobStore(root, fsync=True)
    await store.open()
    await store.put("a/b.jpg", b"durable", content_type="image/jpeg")
    assert await store.get("a/b.jpg") == b"durable"


async def test_reader_never_sees_a_partial_file(blobs: FileBlobStore) -> None:
    """A thread reading the file by path (as a web server would) sees whole blobs."""
    payloads = (b"a" * 1_000_000, b"b" * 700_001)
    info = await blobs.put("big.jpg", payloads[0], content_type="image/jpeg")
    assert info.path is not None
    path = info.path
    stop = threading.Event()
    bad: list[int] = []

    def read() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            if data not in payloads:
                bad.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(40):
            await blobs.put("big.jpg", payloads[n % 2], content_type="image/jpeg")
    finally:
        stop.set()
        reader.join()
    assert bad == []
    assert _all_files(blobs.root) == ["big.jpg"]


async def test_key_and_folder_conflicts(blobs: FileBlobStore) -> None:
    await blobs.put("a", b"file", content_type="image/jpeg")
    with pytest.raises(StorageError, match="'a/b'"):
        await blobs.put("a/b", b"x", content_type="image/jpeg")
    await blobs.put("c/d", b"x", content_type="image/jpeg")
    with pytest.raises(StorageError, match="folder is in the way"):
        await blobs.put("c", b"x", content_type="image/jpeg")
    with pytest.raises(NotFoundError):
        await blobs.get("c")
    assert await blobs.stat("c") is None
    assert await blobs.stat("a/b") is None
    await blobs.delete("c")  # a folder is not a blob: nothing to delete
    assert await blobs.get("c/d") == b"x"
    assert _all_files(blobs.root) == ["a", "c/d"]


# -- failing filesystems -----------------------------------------------------------


def _fail(code: int) -> Any:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


async def test_disk_full_fails_cleanly(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await blobs.put("r/1.jpg", b"old", content_type="image/jpeg")
    monkeypatch.setattr(os, "replace", _fail(errno.ENOSPC))
    with pytest.raises(StorageError, match="disk full"):
        await blobs.put("r/1.jpg", b"new", content_type="image/jpeg")
    monkeypatch.undo()
    assert await blobs.get("r/1.jpg") == b"old"
    assert _all_files(blobs.root) == ["r/1.jpg"]  # no temporary file left


async def test_write_failure_midway_leaves_no_temp_file(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "write", _fail(errno.EDQUOT))
    with pytest.raises(StorageError, match="quota"):
        await blobs.put("r/2.jpg", b"x" * 10, content_type="image/jpeg")
    monkeypatch.undo()
    assert _all_files(blobs.root) == []


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.EIO, "input/output")],
)
async def test_unwritable_filesystem(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    # Running as root, chmod cannot stop a write: fail the system call instead.
    monkeypatch.setattr(os, "open", _fail(code))
    with pytest.raises(StorageError, match=reason):
        await blobs.put("r/3.jpg", b"x", content_type="image/jpeg")


async def test_root_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot create blob folder"):
        await FileBlobStore(tmp_path / "file" / "blobs").open()
    store = FileBlobStore(tmp_path / "file")  # opened by mistake on a file
    with pytest.raises(StorageError):
        await store.put("k.jpg", b"x", content_type="image/jpeg")
    assert await store.stat("k.jpg") is None


async def test_read_error_is_a_storage_error(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await blobs.put("k.jpg", b"x", content_type="image/jpeg")
    monkeypatch.setattr(Path, "read_bytes", _fail(errno.EIO))
    with pytest.raises(StorageError, match="input/output"):
        await blobs.get("k.jpg")


# -- etags and content types -----------------------------------------------------


async def test_etag_is_a_content_hash_seen_by_every_instance(root: Path) -> None:
    writer = FileBlobStore(root)
    await writer.open()
    # The extension says JPEG: only the stored metadata knows it is WebP.
    info = await writer.put("e/1.jpg", b"webp bytes", content_type="image/webp")
    assert info.etag == hashlib.blake2b(b"webp bytes", digest_size=16).hexdigest()
    fresh = FileBlobStore(root)  # another process: nothing cached
    stat = await fresh.stat("e/1.jpg")
    assert stat is not None
    assert stat.etag == info.etag
    if writer._xattrs:
        assert stat.content_type == "image/webp"


async def test_without_xattrs_the_file_is_hashed(root: Path) -> None:
    writer = FileBlobStore(root)
    writer._xattrs = False  # a filesystem without user xattrs
    await writer.open()
    info = await writer.put("e/2.png", b"png bytes", content_type="image/png")
    reader = FileBlobStore(root)
    reader._xattrs = False
    stat = await reader.stat("e/2.png")
    assert stat is not None
    assert stat.etag == info.etag
    assert stat.content_type == "image/png"  # from the extension
    unknown = await writer.put("e/blob", b"?", content_type="application/x-thing")
    assert unknown.content_type == "application/x-thing"
    guessed = await reader.stat("e/blob")
    assert guessed is not None
    assert guessed.content_type == "application/octet-stream"


async def test_file_changed_behind_our_back(blobs: FileBlobStore) -> None:
    info = await blobs.put("e/3.jpg", b"original", content_type="image/jpeg")
    assert info.path is not None
    _append(info.path, b" and more")  # edited in place: the xattr is now stale
    stat = await blobs.stat("e/3.jpg")
    assert stat is not None
    assert stat.size == len(b"original and more")
    assert stat.etag == hashlib.blake2b(b"original and more", digest_size=16).hexdigest()
