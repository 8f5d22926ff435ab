"""Real HTTP servers for tests: image hosts and webhook receivers.

`ImageHost` is an HTTP/1.1 keep-alive server on 127.0.0.1 (a free port),
served from a background thread, so sync and async tests alike can use it.
Routes are registered per test::

    from servers import ImageHost, Reply, make_image

    def test_download() -> None:
        with ImageHost() as host:
            host.add("/a.jpg", make_image("JPEG"), content_type="image/jpeg")
            host.add("/flaky", replies=[Reply(status=500), Reply(status=500),
                                        Reply(body=b"ok")])
            host.redirect("/old", "/a.jpg")
            host.trickle("/slow", b"x" * 10, interval=1.0)   # 1 byte/s
            host.endless("/huge")                            # never ends
            url = host.url("/a.jpg")          # http://127.0.0.1:PORT/a.jpg
            ...
            assert host.hits["/a.jpg"] == 1

As a webhook receiver, every request is recorded (method, path, headers,
body) whether or not a route matches; unknown paths answer 404::

    with ImageHost() as hook:
        hook.add("/hook", status=204)
        ...deliver to hook.url("/hook")...
        [request] = hook.wait_for_requests(1)       # blocks up to 5 s
        assert request.header("webhook-id") and request.json()["type"]

``wait_for_requests`` blocks the calling thread; from async code call it
through ``anyio.to_thread.run_sync`` or poll ``len(host.requests)``.

Fetching from it with `csvimg.fetch` needs the loopback server allowed:
``FetchPolicy(allow=parse_allow(host.allow))``. ``ImageHost(tls=True)``
serves HTTPS with a throw-away CA; pass ``host.client_ssl_context()`` to the
client. ``closed_port()`` gives a port nothing listens on.

Routes match the path without the query string; ``hits`` counts by that
path. A route's replies are served in order and the last one repeats.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import pytest

__all__ = [
    "ImageHost",
    "RecordedRequest",
    "Reply",
    "closed_port",
    "image_host",
    "make_image",
]


@dataclass(frozen=True)
class Reply:
    """One response of a route.

    ``body`` is sent with an exact ``Content-Length`` unless ``chunked``;
    ``delay`` waits before the status line; ``trickle`` sends the body one
    byte per that many seconds; ``endless`` sends chunks of ``body`` (64 KiB
    of zeros if empty) until the client goes away; ``close`` closes the
    connection after the response. ``content_type=None`` sends none.
    """

    body: bytes = b""
    status: int = 200
    content_type: str | None = "application/octet-stream"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    trickle: float | None = None
    endless: bool = False
    chunked: bool = False
    close: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the server received it."""

    method: str
    target: str
    """The request target: path and query string."""
    path: str
    """The path alone, as routes and ``hits`` use it."""
    headers: list[tuple[str, str]]
    """Every header line in order, names as sent."""
    body: bytes
    client: tuple[str, int]

    def header(self, name: str) -> str | None:
        """Return the last value of header *name* (case-insensitive), or None."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[-1] if values else None

    def json(self) -> Any:
        """Return the body decoded as JSON."""
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real image hosts
    # Idle keep-alive connections are dropped after this many seconds, so
    # forgotten clients don't pin handler threads for the whole session.
    timeout = 15
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read .requests, not stderr

    def _serve(self) -> None:
        try:
            body = self._read_request_body()
            reply = self.server.owner._record(
                RecordedRequest(
                    method=self.command,
                    target=self.path,
                    path=urlsplit(self.path).path,
                    headers=list(self.headers.items()),
                    body=body,
                    client=(self.client_address[0], self.client_address[1]),
                )
            )
            self._respond(reply)
        except OSError:  # the client went away: nothing to answer
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve

    def _read_request_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _respond(self, reply: Reply) -> None:
        stopping = self.server.owner._stopping
        if reply.delay and stopping.wait(reply.delay):
            self.close_connection = True
            return
        self.send_response(reply.status)
        if reply.content_type is not None:
            self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        streamed = reply.endless or reply.chunked
        if streamed:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(reply.body)))
        if reply.close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if reply.endless:
            chunk = reply.body or bytes(65536)
            frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            while not stopping.is_set():
                self.wfile.write(frame)  # raises once the client hangs up
            self.close_connection = True
        elif reply.trickle is not None:
            for i in range(len(reply.body)):
                self.wfile.write(reply.body[i : i + 1])
                if stopping.wait(reply.trickle):
                    self.close_connection = True
                    return
        elif reply.chunked:
            if reply.body:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(reply.body), reply.body))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(reply.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: ImageHost, address: str, tls: ssl.SSLContext | None) -> None:
        self.owner = owner
        self.tls = tls
        self.open_sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__((address, 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.open_sockets.add(request)
        self.owner._connected()
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # The handshake runs here, in the connection's own thread, so a slow
        # or failing client never holds up accept().
        with self.tls.wrap_socket(request, server_side=True) as tls_socket:
            with self.lock:
                self.open_sockets.discard(request)
                self.open_sockets.add(tls_socket)
            try:
                super().finish_request(tls_socket, client_address)
            finally:
                with self.lock:
                    self.open_sockets.discard(tls_socket)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up, refuse our certificate or time out are the
        # normal business of a test server; anything else is a bug here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class ImageHost:
    """A real HTTP(S) server on 127.0.0.1 with per-test routes.

    Use it as a context manager (or `start` / `stop`). See the module
    docstring for a tour. Thread-safe: routes may be added while serving.

    Attributes:
        hits: requests served per route path (unknown paths included).
        requests: every request received, in order.
        connections: TCP connections accepted (keep-alive makes it lower
            than the number of requests).
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        tls_names: Sequence[str] = ("localhost", "img.test", "127.0.0.1"),
    ) -> None:
        self.hits: Counter[str] = Counter()
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        self._routes: dict[str, list[Reply]] = {}
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._tls = tls
        self._tls_names = tuple(tls_names)
        self._ca_pem: bytes | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Self:
        """Bind a free port and serve in a daemon thread."""
        context = self._server_tls_context() if self._tls else None
        self._server = _Server(self, "127.0.0.1", context)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ImageHost:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut every open connection (trickles included)."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.drop_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses --------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on."""
        assert self._server is not None, "ImageHost is not started"
        return int(self._server.server_address[1])

    @property
    def scheme(self) -> str:
        """``https`` when serving TLS, else ``http``."""
        return "https" if self._tls else "http"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (or https)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def allow(self) -> str:
        """An allow-list entry for exactly this server: ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str, *, host: str = "127.0.0.1") -> str:
        """The absolute URL of *path*; *host* may be a name such as ``localhost``."""
        if not path.startswith("/"):
            path = "/" + path
        return f"{self.scheme}://{host}:{self.port}{path}"

    # -- routes -----------------------------------------------------------

    def add(
        self,
        path: str,
        body: bytes = b"",
        *,
        content_type: str | None = "application/octet-stream",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
        replies: Iterable[Reply] | None = None,
    ) -> None:
        """Serve *body* at *path*; or, with *replies*, those in turn.

        With *replies* the other arguments are ignored: the first request
        gets the first reply and so on, and the last one repeats (for
        example ``[Reply(status=500), Reply(status=500), Reply(body=b"..")]``).
        """
        if replies is None:
            replies = [
                Reply(
                    body=body,
                    status=status,
                    content_type=content_type,
                    headers=dict(headers or {}),
                    delay=delay,
                )
            ]
        replies = list(replies)
        if not replies:
            raise ValueError("a route needs at least one reply")
        with self._cond:
            self._routes[path] = replies

    def redirect(self, path: str, location: str, *, status: int = 302) -> None:
        """Answer *path* with a redirect to *location* (sent verbatim)."""
        self.add(path, status=status, content_type=None, headers={"Location": location})

    def trickle(
        self,
        path: str,
        body: bytes,
        *,
        interval: float = 1.0,
        content_type: str = "application/octet-stream",
    ) -> None:
        """Send *body* one byte per *interval* seconds (Content-Length exact)."""
        self.add(path, replies=[Reply(body=body, content_type=content_type, trickle=interval)])

    def endless(
        self, path: str, *, chunk: bytes = b"", content_type: str = "application/octet-stream"
    ) -> None:
        """Send a chunked body that never ends (repeating *chunk*)."""
        self.add(path, replies=[Reply(body=chunk, content_type=content_type, endless=True)])

    # -- what happened ----------------------------------------------------

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests whose path is *path*."""
        with self._cond:
            return [r for r in self.requests if r.path == path]

    def wait_for_requests(self, count: int, *, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until *count* requests arrived; return them all.

        Raises:
            TimeoutError: fewer arrived within *timeout* seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"{len(self.requests)} requests arrived, expected {count}")
            return list(self.requests)

    def _record(self, request: RecordedRequest) -> Reply:
        with self._cond:
            self.requests.append(request)
            n = self.hits[request.path]
            self.hits[request.path] += 1
            self._cond.notify_all()
            replies = self._routes.get(request.path)
        if replies is None:
            return Reply(body=b"not found", status=404, content_type="text/plain")
        return replies[min(n, len(replies) - 1)]

    def _connected(self) -> None:
        with self._cond:
            self.connections += 1

    # -- TLS --------------------------------------------------------------

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this server's throw-away CA (TLS only)."""
        assert self._ca_pem is not None, "ImageHost(tls=True) and started"
        return ssl.create_default_context(cadata=self._ca_pem.decode("ascii"))

    def _server_tls_context(self) -> ssl.SSLContext:
        ca_pem, cert_pem, key_pem = _make_certificates(self._tls_names)
        self._ca_pem = ca_pem
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # load_cert_chain reads files only; they can go once loaded.
        with tempfile.TemporaryDirectory() as tmp:
            cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert_file.write_bytes(cert_pem)
            key_file.write_bytes(key_pem)
            context.load_cert_chain(cert_file, key_file)
        return context


def _make_certificates(names: Sequence[str]) -> tuple[bytes, bytes, bytes]:
    """Return (CA cert, server cert, server key) PEMs; the server cert covers *names*."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "csvimg test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_cert.public_bytes(pem), cert.public_bytes(pem), key_pem


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connecting is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_image(
    format: str = "JPEG",
    size: tuple[int, int] = (8, 8),
    color: tuple[int, int, int] = (200, 30, 30),
) -> bytes:
    """Encode a small solid image (``JPEG``, ``PNG``, any Pillow format)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    """A started `ImageHost`, stopped after the test.

    To use it, import it into the test module or ``conftest.py``:
    ``from servers import image_host  # noqa: F401``.
    """
    with ImageHost() as host:
        yield host
