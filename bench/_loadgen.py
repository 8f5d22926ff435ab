"""HTTP load generators for the status API measurement, each in its own process.

- ``wrk`` (Debian's package) when installed: C, one thread, N keep-alive
  connections; costs the least CPU of the two cores.
- Otherwise this module: asyncio streams, N keep-alive HTTP/1.1
  connections, each sending its next GET as soon as the last answer is in,
  for a fixed duration; run as ``python -m bench._loadgen URL ...`` and
  prints one JSON line ``{"requests": n, "errors": n, "seconds": s}``.

Both only target 127.0.0.1 and stop by themselves after ``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["run_load", "wrk_available"]


async def _connection(host: str, port: int, target: str, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    try:
        while time.monotonic() < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if match is None:
                raise RuntimeError("response without Content-Length")
            await reader.readexactly(int(match.group(1)))
            counts[0 if status == 200 else 1] += 1
    finally:
        writer.close()


async def _run(url: str, connections: int, duration: float) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit("the load generator only targets 127.0.0.1")
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    counts = [0, 0]
    start = time.monotonic()
    until = start + duration
    await asyncio.gather(
        *(_connection(host, port, target, until, counts) for _ in range(connections))
    )
    return {"requests": counts[0], "errors": counts[1], "seconds": time.monotonic() - start}


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_load(
    url: str, *, connections: int = 16, duration: float = 5.0, tool: str = "auto"
) -> tuple[float, str]:
    """Requests/s of 200 answers for *url*, from a load generator in another process.

    Returns (requests per second, tool used). Raises if any answer was not 200.
    """
    if tool == "auto":
        tool = "wrk" if wrk_available() else "python"
    timeout = duration + 60
    if tool == "wrk":
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", url],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
        rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
        bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
        errs = re.search(r"Socket errors:.*", out)
        if rps is None:
            raise RuntimeError(f"cannot read wrk's output:\n{out}")
        if bad or errs:
            raise RuntimeError(f"wrk saw errors for {url}:\n{out}")
        return float(rps.group(1)), "wrk"
    if tool != "python":
        raise ValueError(f"unknown load generator {tool!r} (wrk, python, auto)")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench._loadgen",
            url,
            "--connections",
            str(connections),
            "--duration",
            str(duration),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,  # where `bench` is importable
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} non-200 answers from {url}")
    return result["requests"] / result["seconds"], "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    result = asyncio.run(_run(args.url, args.connections, args.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
