"""Experiment: CPU per download of csvimg's Fetcher against plain aiohttp / httpx-aiohttp.

``python bench/experiments/fetch_cpu.py [--n 1500]`` serves the bench's
photos from the bench's image host and downloads them with 32 in flight in
one process, reporting CPU milliseconds (user + system, all threads) per
download. aiohttp and httpx-aiohttp are optional: install them somewhere and
put that on PYTHONPATH (``pip install --target /tmp/aio aiohttp httpx-aiohttp``).
Run from the repository root after one ``python -m bench`` (for the images).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench._static import StaticServer

from csvimg.codec import sniff
from csvimg.fetch import Fetcher, FetchPolicy, parse_allow

IN_FLIGHT = 32
UrlOf = Callable[[int], str]


async def _timed(n: int, one: Callable[[int], Awaitable[int]]) -> tuple[float, float]:
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def limited(i: int) -> int:
        async with sem:
            return await one(i)

    await asyncio.gather(*(limited(i) for i in range(2 * IN_FLIGHT)))  # warm the pool
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(limited(i) for i in range(n)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def csvimg_fetcher(url_of: UrlOf, allow: str, n: int) -> tuple[float, float]:
    async with Fetcher(FetchPolicy(allow=parse_allow(allow))) as fetcher:

        async def one(i: int) -> int:
            return len((await fetcher.fetch(url_of(i), first_chunk_check=sniff)).data)

        return await _timed(n, one)


async def plain_aiohttp(url_of: UrlOf, allow: str, n: int) -> tuple[float, float]:
    aiohttp: Any = importlib.import_module("aiohttp")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def one(i: int) -> int:
            async with session.get(url_of(i)) as response:
                chunks = [c async for c in response.content.iter_chunked(65536)]
                return len(b"".join(chunks))

        return await _timed(n, one)


async def httpx_aiohttp(url_of: UrlOf, allow: str, n: int) -> tuple[float, float]:
    import httpx

    transport: Any = importlib.import_module("httpx_aiohttp").AiohttpTransport()
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:

        async def one(i: int) -> int:
            async with client.stream("GET", url_of(i)) as response:
                chunks = [c async for c in response.aiter_bytes()]
                return len(b"".join(chunks))

        return await _timed(n, one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--work", type=Path, default=Path("bench/_work"))
    args = parser.parse_args()
    clients = {"csvimg Fetcher": csvimg_fetcher}
    for name, fn, module in (
        ("aiohttp", plain_aiohttp, "aiohttp"),
        ("httpx + httpx-aiohttp", httpx_aiohttp, "httpx_aiohttp"),
    ):
        if importlib.util.find_spec(module) is not None:
            clients[name] = fn
    with StaticServer(args.work / "images", args.work) as host:
        allow = f"127.0.0.1:{host.port}"
        for size in ("2MP", "0.3MP"):
            files = sorted((args.work / "images" / size).glob("*.jpg"))

            def url_of(i: int, size: str = size, count: int = len(files)) -> str:
                return f"{host.url}/{size}/photo-{i % count:02d}.jpg?n={i}"

            for name, fn in clients.items():
                wall, cpu = asyncio.run(fn(url_of, allow, args.n))
                print(
                    f"{size:5s} {name:24s} {1000 * cpu / args.n:5.2f} ms CPU/download, "
                    f"{args.n / wall:6.0f} downloads/s"
                )


if __name__ == "__main__":
    main()
