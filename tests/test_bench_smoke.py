"""A tiny run of the bench machinery (``bench/``), so it keeps working.

Benchmarks are not tests: nothing here asserts a speed. It generates two
small photos, runs the codec ceiling on a handful, sends three images end
to end through a real ``csvimg serve`` fetching from the bench's own image
host, loads the status API for half a second, ingests a 50-row CSV, and
writes the report with its plot into ``tmp_path``. Needs the ``bench`` extra
(scikit-image for the photos, matplotlib for the plot); skipped with a
message otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_MISSING = [
    name
    for name in ("skimage", "matplotlib", "uvicorn", "starlette")
    if importlib.util.find_spec(name) is None
]

pytestmark = [
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"bench smoke needs {', '.join(_MISSING)}: pip install -e '.[dev,bench]'",
    ),
    pytest.mark.timeout(120),
]


@pytest.fixture
def bench_path() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


@pytest.mark.usefixtures("bench_path")
def test_bench_smoke(tmp_path: Path) -> None:
    from bench._report import plot, render_markdown, render_text
    from bench._suite import SMOKE, Config, run

    config = Config(
        work=tmp_path / "work",
        counts=SMOKE,
        sizes=("0.3MP-jpeg",),
        static="uvicorn",  # always there; nginx is optional
        loadgen="python",
        per_size=2,
    )
    results = run(config, ["codec", "status", "ingest"])

    measures = {row.measure for row in results.rows}
    assert measures == {"codec ceiling", "status API", "ingest"}
    for row in results.rows:
        assert row.ratio is None or row.ratio > 0, row
    assert results.series["e2e"] and results.series["ceiling"]

    out = tmp_path / "docs" / "performance.md"
    image = out.parent / "img" / "performance.png"
    assert plot(results, image)
    assert image.read_bytes().startswith(b"\x89PNG")
    text = render_markdown(results, image="img/performance.png", findings="", rerun="rerun")
    out.write_text(text)
    assert "| codec ceiling |" in text
    assert "libjpeg-turbo" in text
    assert "codec ceiling" in render_text(results.rows)


@pytest.mark.usefixtures("bench_path")
def test_bench_cli_rejects_unknown_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    from bench._cli import main

    assert main(["--only", "nope", "--out", "-"]) == 2
    assert "unknown measurement" in capsys.readouterr().err


@pytest.mark.usefixtures("bench_path")
def test_bench_bombs_are_what_they_claim() -> None:
    import io

    from bench._images import make_jpeg_header_bomb, make_png_bomb
    from PIL import Image

    png = make_png_bomb(300, 200)
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (300, 200)
        im.load()
    # Pillow's own guard refuses 3.6 gigapixels from the header alone.
    with pytest.raises(Image.DecompressionBombError, match="3600000000 pixels"):
        Image.open(io.BytesIO(make_jpeg_header_bomb(60_000, 60_000)))
