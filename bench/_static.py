"""The image host of the bench: a keep-alive static server in its own process.

Two implementations, same behaviour (HTTP/1.1 keep-alive, ``Content-Length``,
query strings ignored so every CSV row can have its own URL, optional fixed
latency before each response):

- **nginx** (Debian's ``nginx-light`` + ``libnginx-mod-http-echo`` for the
  latency): sendfile, a few microseconds of CPU per response, so the image
  host takes almost nothing from the two cores the product is measured on.
  Used when ``nginx`` is on the PATH (``--static auto``, the default).
- **uvicorn** running the raw ASGI app below (files preloaded in memory,
  ``asyncio.sleep`` for the latency): always available, costs ~0.2-0.5 ms of
  CPU per response, which is charged to the product's share of the machine.

Never ``python -m http.server``: HTTP/1.0 without keep-alive.

Run alone: ``python -m bench._static --root DIR --port N [--latency 0.2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import mimetypes
import shutil
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from bench._proc import Proc, Stoppable, free_port, wait_http

__all__ = ["StaticServer", "make_app", "nginx_available"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def make_app(root: Path, latency: float = 0.0) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A raw ASGI app serving the files under *root* from memory."""
    files: dict[str, tuple[bytes, bytes]] = {}
    for path in root.rglob("*"):
        if path.is_file():
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files["/" + path.relative_to(root).as_posix()] = (path.read_bytes(), kind.encode())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        found = files.get(scope["path"])
        if scope["path"] == "/healthz":
            found = (b"ok", b"text/plain")
        elif latency:
            await asyncio.sleep(latency)
        if found is None:
            body, kind, status = b"not found", b"text/plain", 404
        else:
            (body, kind), status = found, 200
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def nginx_available() -> bool:
    return shutil.which("nginx") is not None


def _nginx_conf(work: Path, root: Path, port: int, latency: float) -> str:
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    if latency:
        if not _ECHO_MODULE.exists():
            raise RuntimeError(
                f"nginx latency needs {_ECHO_MODULE} (apt-get install libnginx-mod-http-echo)"
            )
        load = f"load_module {_ECHO_MODULE};"
        location = (
            f"location / {{ echo_sleep {latency:.3f}; echo_exec @file; }}\n"
            "    location @file { try_files $uri =404; }"
        )
    else:
        load = ""
        location = "location / { try_files $uri =404; }"
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
{load}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    sendfile on; tcp_nopush on; tcp_nodelay on;
    keepalive_requests 1000000; keepalive_timeout 300s;
    types {{ image/jpeg jpg; image/png png; text/plain txt; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
        location = /healthz {{ return 200 "ok"; }}
        {location}
    }}
}}
"""


class StaticServer(Stoppable):
    """Serve *root* on a free 127.0.0.1 port in another process (see the module doc)."""

    def __init__(self, root: Path, work: Path, *, latency: float = 0.0, kind: str = "auto") -> None:
        if kind == "auto":
            kind = (
                "nginx"
                if nginx_available() and (not latency or _ECHO_MODULE.exists())
                else "uvicorn"
            )
        self.kind = kind
        self.root = root.absolute()
        self.latency = latency
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = work.absolute() / f"static-{kind}-{self.port}"
        self.work.mkdir(parents=True, exist_ok=True)
        if kind == "nginx":
            conf = self.work / "nginx.conf"
            conf.write_text(_nginx_conf(self.work, self.root, self.port, latency))
            argv = [
                "nginx",
                "-c",
                str(conf),
                "-p",
                str(self.work),
                "-e",
                str(self.work / "error.log"),
            ]
        elif kind == "uvicorn":
            argv = [
                sys.executable,
                "-m",
                "bench._static",
                "--root",
                str(self.root),
                "--port",
                str(self.port),
                "--latency",
                str(latency),
            ]
        else:
            raise ValueError(f"unknown static server kind {kind!r} (nginx, uvicorn, auto)")
        self.proc = Proc(
            argv,
            log_path=self.work / "server.log",
            name=f"static ({kind})",
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            wait_http(self.url + "/healthz", self.proc, timeout=30)
        except BaseException:
            self.proc.stop()
            raise

    def stop(self) -> None:
        self.proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each response")
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(
        make_app(args.root, args.latency),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=300,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
