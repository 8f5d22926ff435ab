"""``import csvimg`` stays light: Pillow and aiohttp load only when used.

Each check runs in a fresh interpreter, since this test process has long
imported both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def _run(code: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_engine_on_memory_imports_neither_pillow_nor_aiohttp() -> None:
    out = _run(
        """
        import sys
        import csvimg
        from csvimg import Engine, Settings
        e = Engine(Settings(storage_url="memory://", blobs_url="memory://"))
        assert e.notifier is not None  # the webhook notifier, built without its client
        import csvimg.fetch
        policy = csvimg.fetch.FetchPolicy(allow=csvimg.fetch.parse_allow("127.0.0.1"))
        csvimg.fetch.check_url("http://127.0.0.1/a.jpg")
        assert csvimg.sniff(b"\\xff\\xd8\\xff\\xe0") == "JPEG"
        csvimg.CodecLimits.from_env({})
        print(sorted(m for m in ("PIL", "aiohttp", "yarl", "aiohappyeyeballs") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("compress", "PIL"),
        ("Compressed", "PIL"),
        ("Fetcher", "aiohttp"),
        ("Fetched", "aiohttp"),
    ],
)
def test_lazy_names_load_their_library(name: str, module: str) -> None:
    out = _run(
        f"""
        import sys
        import csvimg
        assert {module!r} not in sys.modules
        value = getattr(csvimg, {name!r})
        assert value.__name__ == {name!r}
        print({module!r} in sys.modules)
        """
    )
    assert out.strip() == "True"


def test_compress_works_through_the_lazy_name() -> None:
    out = _run(
        """
        import io
        import csvimg
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
        print(csvimg.compress(buf.getvalue(), csvimg.ProcessOptions()).format)
        """
    )
    assert out.strip() == "JPEG"


def test_every_public_name_resolves() -> None:
    out = _run(
        """
        import csvimg, csvimg.codec, csvimg.fetch
        for module in (csvimg, csvimg.codec, csvimg.fetch):
            for name in module.__all__:
                getattr(module, name)
        namespace = {}
        exec("from csvimg import *", namespace)
        missing = set(csvimg.__all__) - set(namespace)
        print(sorted(missing))
        """
    )
    assert out.strip() == "[]"


def test_unknown_names_still_raise() -> None:
    _run(
        """
        import csvimg, csvimg.codec, csvimg.fetch
        for module in (csvimg, csvimg.codec, csvimg.fetch):
            try:
                module.no_such_name
            except AttributeError:
                pass
            else:
                raise SystemExit(f"{module.__name__}.no_such_name did not raise")
        """
    )
