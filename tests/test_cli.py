"""The ``csvimg`` command: process, validate, status, help, options and env.

``serve`` and ``worker`` run as processes in ``test_server_process.py``;
here they are covered through their option handling.
"""

from __future__ import annotations

import csv
import json
import os
import pty
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from csvimg.settings import Settings
from csvimg_server import create_app
from csvimg_server.cli import _backend_settings, build_parser, main
from server_helpers import ThreadServer, make_csv, photo_host, wait_finished
from servers import ImageHost, closed_port

__all__ = ["photo_host"]  # a fixture, imported for pytest

pytestmark = pytest.mark.timeout(60)

COMMANDS = ("serve", "worker", "process", "validate", "status")


@pytest.fixture
def env(photo_host: ImageHost) -> dict[str, str]:
    """A clean environment that lets the fetcher reach the test image host."""
    return {"CSVIMG_FETCH_ALLOW": photo_host.allow}


def _csv(tmp_path: Path, host: ImageHost, name: str = "products.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(
        make_csv(
            [
                ["1", "Shirt", f"{host.url('/a.jpg')},{host.url('/c.png')}"],
                ["2", "Mug", f"{host.url('/nope.jpg')},{host.url('/b.jpg')}"],
            ]
        )
    )
    return path


# ------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command_shows_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"csvimg {command}" in out


def test_top_level_help_and_console_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    script = shutil.which("csvimg", path=str(Path(sys.executable).parent))
    assert script is not None, "the csvimg console script is not installed"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0 and "examples:" in result.stdout
    result = subprocess.run([sys.executable, "-m", "csvimg_server", "process", "--help"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and "--base-url" in result.stdout


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "required"),
        (["frobnicate"], {}, "invalid choice"),
        (["process", "x.csv"], {}, "--out"),
        (["process", "/nonexistent/x.csv", "--out", "/tmp/x"], {}, "no such file"),
        (["validate", "/nonexistent/x.csv"], {}, "no such file"),
        (["serve", "--port", "eighty"], {}, "invalid int"),
        (["serve"], {"CSVIMG_PORT": "eighty"}, "CSVIMG_PORT"),
        (["serve"], {"CSVIMG_WORKERS": "-1"}, "CSVIMG_WORKERS"),
        (["serve", "--storage", "mongodb://x"], {}, "mongodb"),
        (["worker", "--concurrency", "0"], {}, "--concurrency"),
        (["serve", "--log-level", "loud"], {}, "invalid choice"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
    environ: dict[str, str], message: str,
) -> None:
    environ = {"CSVIMG_DATA_DIR": str(tmp_path / "data"), **environ}
    assert main(argv, environ=environ) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------- settings


def test_option_beats_env_beats_data_dir(tmp_path: Path) -> None:
    parser = build_parser()
    data = tmp_path / "data"
    args = parser.parse_args(["serve", "--data-dir", str(data)])
    settings = _backend_settings(args, {})
    assert settings.storage_url == f"sqlite:///{data}/csvimg.db"
    assert settings.blobs_url == f"file://{data}/images"
    assert settings.effective_queue_url == settings.storage_url

    env = {
        "CSVIMG_STORAGE": "memory://",
        "CSVIMG_QUEUE": "memory://",
        "CSVIMG_BLOBS": "memory://",
        "CSVIMG_DATA_DIR": str(tmp_path / "elsewhere"),
        "CSVIMG_CONCURRENCY": "7",
    }
    from_env = _backend_settings(parser.parse_args(["worker"]), env)
    assert (from_env.storage_url, from_env.queue_url, from_env.blobs_url) == (
        "memory://", "memory://", "memory://")
    assert from_env.concurrency == 7

    argv = ["serve", "--storage", f"sqlite:///{tmp_path}/x.db", "--blobs",
            f"file://{tmp_path}/b", "--queue", "memory://", "--concurrency", "3",
            "--public-url", "https://img.example.com"]
    options = _backend_settings(parser.parse_args(argv), env)
    assert options.storage_url == f"sqlite:///{tmp_path}/x.db"
    assert options.blobs_url == f"file://{tmp_path}/b"
    assert options.queue_url == "memory://"
    assert options.concurrency == 3
    assert options.public_url == "https://img.example.com"


def test_webhook_secret_is_kept_in_the_data_dir(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path / "d")])
    first = _backend_settings(args, {}).webhook_secret
    second = _backend_settings(parser.parse_args(["worker", "--data-dir",
                                                  str(tmp_path / "d")]), {}).webhook_secret
    assert first == second and first.startswith("whsec_")
    assert (tmp_path / "d" / "webhook-secret").stat().st_mode & 0o777 == 0o600
    fixed = _backend_settings(args, {"CSVIMG_WEBHOOK_SECRET": "whsec_" + "A" * 32})
    assert fixed.webhook_secret == "whsec_" + "A" * 32


# ---------------------------------------------------------------- process


def test_process_with_one_bad_url(
    tmp_path: Path, photo_host: ImageHost, env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = _csv(tmp_path, photo_host)
    out = tmp_path / "out"
    assert main(["process", str(source), "--out", str(out)], environ=env) == 0
    printed = capsys.readouterr().out
    assert "3 images compressed, 1 failed" in printed
    assert f"row 3: {photo_host.url('/nope.jpg')}: http-404" in printed
    assert "saved" in printed and "%" in printed

    table = list(csv.reader((out / "products-output.csv").open()))
    assert table[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    first, second = table[1][3].split(","), table[2][3].split(",")
    assert len(first) == 2 and len(second) == 2
    assert second[0] == ""  # the bad URL keeps its place, empty
    for relative in [*first, second[1]]:
        assert relative.startswith("images/")
        image = out / relative
        with Image.open(image) as im:
            assert im.format == "JPEG"


def test_process_base_url_and_options(
    tmp_path: Path, photo_host: ImageHost, env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "one.csv"
    source.write_bytes(make_csv([["1", "A", photo_host.url("/d.jpg")]]))
    out = tmp_path / "site"
    argv = ["process", str(source), "--out", str(out), "--base-url",
            "https://cdn.example.com/site/", "--max-dimension", "64", "--quality", "70"]
    assert main(argv, environ=env) == 0
    [row] = list(csv.reader((out / "one-output.csv").open()))[1:]
    assert row[3].startswith("https://cdn.example.com/site/images/")
    with Image.open(out / row[3].removeprefix("https://cdn.example.com/site/")) as im:
        assert max(im.size) == 64
    assert main([*argv, "--quality", "0"], environ=env) == 2


def test_process_invalid_csv_exits_1_with_the_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad.csv"
    source.write_text("S. No.,Product Name,Input Image Urls\n1,,ftp://x/y.jpg\n1,B,\n")
    assert main(["process", str(source), "--out", str(tmp_path / "out")], environ={}) == 1
    printed = capsys.readouterr().out
    for code in ("blank-product-name", "bad-scheme", "duplicate-serial", "no-urls"):
        assert code in printed
    assert "row" in printed and "column" in printed and "message" in printed
    assert not (tmp_path / "out" / "bad-output.csv").exists()


def test_process_shows_a_progress_bar_on_a_terminal(
    tmp_path: Path, photo_host: ImageHost, env: dict[str, str]
) -> None:
    source = _csv(tmp_path, photo_host)
    primary, replica = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "csvimg_server", "process", str(source), "--out",
         str(tmp_path / "out")],
        stdout=replica, stderr=subprocess.DEVNULL, env={**os.environ, **env, "COLUMNS": "120"},
    )
    os.close(replica)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert proc.wait(30) == 0
    text = output.decode(errors="replace")
    assert "compressing" in text and "4/4" in text
    assert "1 failed" in text


# --------------------------------------------------------------- validate


def test_validate(tmp_path: Path, photo_host: ImageHost,
                  capsys: pytest.CaptureFixture[str]) -> None:
    good = _csv(tmp_path, photo_host)
    assert main(["validate", str(good)], environ={}) == 0
    assert capsys.readouterr().out.strip() == "OK: 2 rows, 4 images"

    bad = tmp_path / "bad.csv"
    bad.write_text("Serial;Name;Urls\n1;a;https://x/y.jpg\n")
    assert main(["validate", str(bad)], environ={}) == 1
    assert "wrong-delimiter" in capsys.readouterr().out

    big = tmp_path / "big.csv"
    big.write_bytes(good.read_bytes() * 3)
    assert main(["validate", str(big)], environ={"CSVIMG_MAX_UPLOAD_BYTES": "100"}) == 1
    assert "too-large" in capsys.readouterr().out


# ----------------------------------------------------------------- status


@pytest.fixture
def api(photo_host: ImageHost) -> Iterator[ThreadServer]:
    from csvimg.fetch import FetchPolicy, parse_allow

    settings = Settings(fetch=FetchPolicy(allow=parse_allow(photo_host.allow)))
    with ThreadServer(create_app(settings, workers=1, shutdown_grace=0.05)) as srv:
        yield srv


def test_status_command(api: ThreadServer, photo_host: ImageHost,
                        capsys: pytest.CaptureFixture[str]) -> None:
    body = make_csv([["1", "A", photo_host.url("/a.jpg")]])
    with httpx.Client() as client:
        request_id = client.post(api.url + "/api/v1/upload",
                                 files={"file": ("a.csv", body)}).json()["request_id"]
        wait_finished(client, api.url, request_id)
    assert main(["status", request_id, "--server", api.url], environ={}) == 0
    printed = capsys.readouterr().out
    assert "COMPLETED" in printed and "1 done, 0 failed, 1 total" in printed
    assert f"{api.url}/api/v1/requests/{request_id}/output.csv" in printed

    assert main(["status", request_id, "--json"], environ={"CSVIMG_SERVER": api.url}) == 0
    assert json.loads(capsys.readouterr().out)["request_id"] == request_id

    assert main(["status", "nope", "--server", api.url], environ={}) == 1
    assert "404" in capsys.readouterr().err
    unreachable = f"http://127.0.0.1:{closed_port()}"
    assert main(["status", request_id, "--server", unreachable], environ={}) == 1
    assert "cannot reach" in capsys.readouterr().err

