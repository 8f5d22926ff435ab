"""csvimg: bulk image compression driven by a CSV.

A CSV of products with image URLs goes in; every image is downloaded,
compressed and stored; an output CSV with the new image URLs comes out.
Storage, queue, blob store and notifier backends are chosen by URL and
extended by pluggy plugins (entry-point group ``csvimg``).

Embedding it in one process::

    import anyio
    import csvimg

    async def main() -> None:
        async with csvimg.Engine(csvimg.Settings()) as engine:  # memory:// backends
            request = await engine.submit(open("products.csv", "rb").read())
            await engine.run_until_finished(request.id)
            print(await engine.output_csv_bytes(request.id))

    anyio.run(main)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING as _TYPE_CHECKING

from csvimg._errors import (
    CallbackUrlError,
    CodecError,
    ConfigError,
    CsvimgError,
    FetchError,
    ItemError,
    ManifestError,
    NotFinishedError,
    NotFoundError,
    PluginError,
    StorageError,
    TransitionError,
    UnknownSchemeError,
)
from csvimg._util import lazy_exports as _lazy_exports
from csvimg.backends import BlobInfo, BlobStore, Claim, Notifier, Queue, Storage
from csvimg.codec import CodecLimits, sniff
from csvimg.engine import Engine
from csvimg.fetch import FetchPolicy
from csvimg.hooks import BackendRegistry, hookimpl
from csvimg.jobs import (
    Delivery,
    Event,
    Item,
    ItemResult,
    ItemStatus,
    ProcessOptions,
    Request,
    RequestStatus,
    Row,
    Webhook,
)
from csvimg.manifest import Manifest, ManifestLimits, Problem, parse_manifest
from csvimg.output import OUTPUT_COLUMN, neutralise
from csvimg.plugins import Plugins
from csvimg.settings import Settings

if _TYPE_CHECKING:
    from csvimg.codec import Compressed, compress
    from csvimg.fetch import Fetched, Fetcher

try:
    __version__ = _version("csvimg")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "OUTPUT_COLUMN",
    "BackendRegistry",
    "BlobInfo",
    "BlobStore",
    "CallbackUrlError",
    "Claim",
    "CodecError",
    "CodecLimits",
    "Compressed",
    "ConfigError",
    "CsvimgError",
    "Delivery",
    "Engine",
    "Event",
    "FetchError",
    "FetchPolicy",
    "Fetched",
    "Fetcher",
    "Item",
    "ItemError",
    "ItemResult",
    "ItemStatus",
    "Manifest",
    "ManifestError",
    "ManifestLimits",
    "NotFinishedError",
    "NotFoundError",
    "Notifier",
    "PluginError",
    "Plugins",
    "Problem",
    "ProcessOptions",
    "Queue",
    "Request",
    "RequestStatus",
    "Row",
    "Settings",
    "Storage",
    "StorageError",
    "TransitionError",
    "UnknownSchemeError",
    "Webhook",
    "__version__",
    "compress",
    "hookimpl",
    "neutralise",
    "parse_manifest",
    "sniff",
]

# Names whose modules need Pillow or aiohttp: loaded on first use, so that
# ``import csvimg`` (and an Engine that has not fetched yet) stays light.
# Hidden from type checkers, which see the imports above and so still
# report a misspelt name.
if not _TYPE_CHECKING:
    __getattr__ = _lazy_exports(
        globals(),
        {
            "Compressed": "csvimg.codec",
            "compress": "csvimg.codec",
            "Fetched": "csvimg.fetch",
            "Fetcher": "csvimg.fetch",
        },
    )
