"""A blob store in a local folder (``file:///abs/dir``).

Keys map to paths under the folder (``<request_id>/<seq>.jpg`` becomes a
sub-folder and a file), so the server can hand a file straight to the
client (`BlobInfo.path`).

URLs::

    file:///var/lib/csvimg/blobs       absolute
    file://localhost/var/lib/blobs     absolute (the only host allowed)
    file:blobs   or   file://./blobs   relative to the working directory
    file:///srv/blobs?fsync=1          fsync every blob before it appears

Relative folders are made absolute when the URL is read, so a later
``chdir`` changes nothing.

Writes are atomic: the bytes go to a temporary file in the target's own
folder, which `os.replace` then renames over the key, so a reader sees
the old blob or the new one, never half of one. With ``fsync`` the file
(and its folder) are also flushed to disk first, so a power cut cannot
leave an empty file behind a committed item.

The etag is a BLAKE2b hash of the bytes (the same as ``memory://``),
computed at `put` time where the bytes are at hand, and kept with the
declared content type in an extended attribute (``user.csvimg``) together
with the size and mtime it belongs to. `stat` trusts the attribute only
when size and mtime still match (an in-place edit keeping the size within
one clock tick would go unseen; csvimg itself never edits in place);
otherwise (a filesystem without user xattrs, a file edited by hand) it
hashes the file, remembering the answer in a small per-process cache
keyed by inode, size and mtime. The content type then comes from the
key's extension.

Keys are checked by `check_key`; one that could escape the folder raises
`ValueError`. The folder itself is trusted: symbolic links an
administrator puts inside it are followed. Failing filesystems (disk
full, read-only, permission denied) raise `StorageError` with the
reason, so one item fails with a message instead of the worker crashing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mimetypes
import os
import stat
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from urllib.parse import parse_qsl, unquote

import anyio.to_thread

from csvimg._errors import ConfigError, NotFoundError, StorageError
from csvimg.backends import MAX_KEY_LENGTH, BlobInfo, check_key
from csvimg.hooks import BackendRegistry, hookimpl
from csvimg.settings import Settings

__all__ = ["MAX_KEY_LENGTH", "FileBlobStore", "check_key", "parse_file_url"]


_XATTR = "user.csvimg"
_TMP_PREFIX = ".csvimg-tmp-"
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "a folder is in the way",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
}


def parse_file_url(url: str) -> tuple[Path, bool]:
    """Return the absolute folder and the fsync flag of a ``file:`` URL.

    See the module docstring for the accepted forms.
    """
    scheme, sep, rest = url.partition(":")
    if not sep or scheme.lower() != "file":
        raise ConfigError(f"not a file URL: {url!r}")
    rest, _, query = rest.partition("?")
    raw = rest
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        # file:///abs and file://localhost/abs are absolute; any other
        # "host" (file://./blobs, file://blobs) is read as a relative folder.
        raw = slash + path if authority in ("", "localhost") else rest[2:]
    raw = unquote(raw)
    if not raw:
        raise ConfigError(f"file URL {url!r} names no folder (e.g. file:///var/lib/blobs)")
    if "\x00" in raw:
        raise ConfigError(f"file URL {url!r} holds a NUL character")
    fsync = False
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name != "fsync":
            raise ConfigError(f"unknown file URL parameter {name!r} in {url!r} (known: fsync)")
        if value.lower() not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"fsync must be 0 or 1, not {value!r}")
        fsync = value.lower() in ("", "1", "true", "yes")
    return Path(raw).expanduser().absolute(), fsync


def _content_type_of(key: str) -> str:
    guessed, _ = mimetypes.guess_type(key, strict=False)
    return guessed or "application/octet-stream"


def _etag_of(data: bytes) -> str:
    # Same hash as the memory store, so etags agree across backends.
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FileBlobStore:
    """Blobs as files under one folder; see `csvimg.backends.BlobStore`."""

    cache_size = 4096
    """How many etags of files without a usable xattr a process remembers."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root).absolute()
        self.fsync = fsync
        self._lock = threading.Lock()
        self._etags: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self._xattrs = hasattr(os, "setxattr")

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> FileBlobStore:
        """Build from ``file:///dir`` (see `parse_file_url`)."""
        root, fsync = parse_file_url(url)
        return cls(root, fsync=fsync)

    def __repr__(self) -> str:
        return f"FileBlobStore({str(self.root)!r})"

    def path_of(self, key: str) -> Path:
        """Return the file path of *key* (checked with `check_key`)."""
        return self.root.joinpath(*check_key(key).split("/"))

    def _error(self, action: str, key: str, exc: OSError) -> StorageError:
        reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        return StorageError(f"cannot {action} blob {key!r} in {self.root}: {reason}")

    async def open(self) -> None:
        """Create the folder if needed."""

        def setup() -> None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create blob folder {self.root}: {exc}") from exc

        await anyio.to_thread.run_sync(setup)

    async def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""

    # -- put ---------------------------------------------------------------

    def _put(self, key: str, path: Path, data: bytes, content_type: str) -> BlobInfo:
        etag = _etag_of(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error("store", key, exc) from exc
        tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            # Mode 0o666 minus the umask, like any file: the web server may
            # run as another user (mkstemp would make it 0o600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
                st = os.fstat(fd)
                self._set_meta(fd, st, etag, content_type)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self.fsync:
                self._fsync_dir(path.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError):
                raise self._error("store", key, exc) from exc
            raise
        self._remember(st, etag)
        return BlobInfo(key=key, size=st.st_size, content_type=content_type, etag=etag, path=path)

    def _set_meta(self, fd: int, st: os.stat_result, etag: str, content_type: str) -> None:
        if not self._xattrs:
            return
        value = f"{st.st_size}:{st.st_mtime_ns}:{etag}:{content_type}".encode()
        try:
            os.setxattr(fd, _XATTR, value)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.E2BIG):
                # This filesystem keeps no user xattrs: stat will hash instead.
                self._xattrs = False
                return
            raise

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        # Makes the rename itself durable, not only the file's bytes.
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def put(self, key: str, data: bytes, *, content_type: str) -> BlobInfo:
        """Write *data* to a temporary file, then rename it over *key*."""
        path = self.path_of(key)
        return await anyio.to_thread.run_sync(self._put, key, path, bytes(data), content_type)

    # -- get / stat / delete -------------------------------------------------

    def _get(self, key: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            if exc.errno in _MISSING:
                raise NotFoundError(f"no blob {key!r}") from None
            raise self._error("read", key, exc) from exc

    async def get(self, key: str) -> bytes:
        """Return the blob's bytes; `NotFoundError` when missing."""
        path = self.path_of(key)
        return await anyio.to_thread.run_sync(self._get, key, path)

    def _remember(self, st: os.stat_result, etag: str) -> None:
        with self._lock:
            self._etags[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = etag
            while len(self._etags) > self.cache_size:
                self._etags.popitem(last=False)

    def _stat(self, key: str, path: Path) -> BlobInfo | None:
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno in _MISSING:
                return None
            raise self._error("stat", key, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            return None  # a folder of other blobs is not a blob
        etag, content_type = self._read_meta(path, st)
        if etag is None:
            with self._lock:
                etag = self._etags.get((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        if etag is None:
            try:
                data = path.read_bytes()
            except OSError as exc:
                if exc.errno in _MISSING:
                    return None
                raise self._error("read", key, exc) from exc
            if len(data) != st.st_size:
                # Replaced between stat and read: describe what we read.
                st = os.stat(path)
            etag = _etag_of(data)
            self._remember(st, etag)
        return BlobInfo(
            key=key,
            size=st.st_size,
            content_type=content_type or _content_type_of(key),
            etag=etag,
            path=path,
        )

    def _read_meta(self, path: Path, st: os.stat_result) -> tuple[str | None, str | None]:
        if not self._xattrs:
            return None, None
        try:
            raw = os.getxattr(path, _XATTR).decode()
        except (OSError, UnicodeDecodeError):
            return None, None
        size, _, rest = raw.partition(":")
        mtime, _, rest = rest.partition(":")
        etag, _, content_type = rest.partition(":")
        if size != str(st.st_size) or mtime != str(st.st_mtime_ns) or not etag:
            return None, None  # stale: the file changed behind our back
        return etag, content_type or None

    async def stat(self, key: str) -> BlobInfo | None:
        """Return the blob's info (with its file path), or None when missing."""
        path = self.path_of(key)
        return await anyio.to_thread.run_sync(self._stat, key, path)

    def _delete(self, key: str, path: Path) -> None:
        try:
            path.unlink()
        except OSError as exc:
            if exc.errno in _MISSING:
                return
            raise self._error("delete", key, exc) from exc

    async def delete(self, key: str) -> None:
        """Remove the blob's file (missing is fine; empty folders stay).

        Folders are not pruned: a concurrent `put` into the same folder
        could lose the race and fail.
        """
        path = self.path_of(key)
        await anyio.to_thread.run_sync(self._delete, key, path)


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``file:///dir`` for blobs."""
    registry.add_blobs("file", FileBlobStore.from_url)
