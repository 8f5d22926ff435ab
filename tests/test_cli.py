"""The ``csvimg`` command: process, validate, status, help, options and env.

``serve`` and ``worker`` run as processes in ``test_server_process.py``;
here they are covered through their option handling, their logging
options and their throughput lines. Progress output is tested both ways:
plain lines when stdout is not a terminal, rich bars on a pty.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import pty
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from PIL import Image

from csvimg.settings import Settings
from csvimg_server import _process, create_app
from csvimg_server._process import Tally, ThroughputLog
from csvimg_server.cli import (
    DEFAULT_STATS_INTERVAL,
    UsageError,
    build_parser,
    main,
)
from csvimg_server.cli._backends import backend_settings, resolve_queue
from csvimg_server.cli._options import stats_interval
from server_helpers import (
    ServeProcess,
    ThreadServer,
    make_csv,
    photo_host,
    photo_jpeg,
    wait_finished,
    wait_until,
)
from servers import ImageHost, closed_port

__all__ = ["photo_host"]  # a fixture, imported for pytest

pytestmark = pytest.mark.timeout(60)

COMMANDS = ("serve", "worker", "process", "validate", "status")
API_KEY = "cli-test-key-0123456789"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what ``configure_logging`` did to the root logger of this process."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


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
    ("command", "options"),
    [
        ("serve", ["--log-level", "--log-format", "--stats-interval", "CSVIMG_LOG_FORMAT",
                   "CSVIMG_STATS_INTERVAL"]),
        ("worker", ["--log-level", "--log-format", "--stats-interval"]),
        ("process", ["--log-level", "--log-format", "CSVIMG_LOG_LEVEL"]),
        ("status", ["--api-key", "CSVIMG_API_KEY", "--watch", "--interval", "--json"]),
        ("validate", ["row, column, code, message"]),
    ],
)
def test_help_documents_the_options(
    command: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option in options:
        assert option in out


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_build_parser_exposes_every_subcommand() -> None:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(COMMANDS)
    for name in ("serve", "worker", "process"):
        assert {"--log-level", "--log-format"} <= _options(sub.choices[name])
    assert "--stats-interval" in _options(sub.choices["serve"]) & _options(sub.choices["worker"])
    assert {"--api-key", "--watch", "--interval"} <= _options(sub.choices["status"])


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
        (["serve", "--log-format", "xml"], {}, "invalid choice"),
        (["serve"], {"CSVIMG_LOG_FORMAT": "xml"}, "CSVIMG_LOG_FORMAT"),
        (["worker"], {"CSVIMG_LOG_LEVEL": "loud"}, "CSVIMG_LOG_LEVEL"),
        (["process", "x.csv", "--out", "o", "--log-format", "yaml"], {}, "invalid choice"),
        (["serve"], {"CSVIMG_STATS_INTERVAL": "soon"}, "CSVIMG_STATS_INTERVAL"),
        (["worker", "--stats-interval", "-1"], {}, "--stats-interval"),
        (["status", "x", "--interval", "0"], {}, "--interval"),
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
    settings = backend_settings(args, {})
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
    from_env = backend_settings(parser.parse_args(["worker"]), env)
    assert (from_env.storage_url, from_env.queue_url, from_env.blobs_url) == (
        "memory://", "memory://", "memory://")
    assert from_env.concurrency == 7

    argv = ["serve", "--storage", f"sqlite:///{tmp_path}/x.db", "--blobs",
            f"file://{tmp_path}/b", "--queue", "memory://", "--concurrency", "3",
            "--public-url", "https://img.example.com"]
    options = backend_settings(parser.parse_args(argv), env)
    assert options.storage_url == f"sqlite:///{tmp_path}/x.db"
    assert options.blobs_url == f"file://{tmp_path}/b"
    assert options.queue_url == "memory://"
    assert options.concurrency == 3
    assert options.public_url == "https://img.example.com"


class _KeyValueEntryPoint:
    """An installed storage-only plugin (``kv``) that asks for the memory queue."""

    name = "kv"
    value = "csvimg_kv"
    group = "csvimg"

    def load(self) -> object:
        from csvimg import BackendRegistry, hookimpl
        from csvimg.backends.memory import MemoryStorage

        class KeyValue:
            @hookimpl
            def csvimg_register_backends(self, registry: BackendRegistry) -> None:
                registry.add_storage("kv", lambda url, settings: MemoryStorage(), queue="memory")

        return KeyValue()


def test_serve_resolves_the_queue_as_the_engine_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csvimg.plugins

    monkeypatch.setattr(csvimg.plugins, "entry_points", lambda **_: [_KeyValueEntryPoint()])
    parser = build_parser()
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path), "--storage", "kv://x"])
    settings = resolve_queue(backend_settings(args, {}), {})
    assert settings.queue_url == "memory://"
    assert settings.queue_url == csvimg.plugins.Plugins().queue_url(backend_settings(args, {}))
    # the SQLite default keeps its queue in the same database; --queue wins
    default = resolve_queue(backend_settings(parser.parse_args(["serve", "--data-dir",
                                                                str(tmp_path)]), {}), {})
    assert default.queue_url == default.storage_url
    explicit = parser.parse_args(["serve", "--data-dir", str(tmp_path), "--storage", "kv://x",
                                  "--queue", f"sqlite:///{tmp_path}/q.db"])
    assert resolve_queue(backend_settings(explicit, {}), {}).queue_url == (
        f"sqlite:///{tmp_path}/q.db")


def test_webhook_secret_is_kept_in_the_data_dir(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path / "d")])
    first = backend_settings(args, {}).webhook_secret
    second = backend_settings(parser.parse_args(["worker", "--data-dir",
                                                  str(tmp_path / "d")]), {}).webhook_secret
    assert first == second and first.startswith("whsec_")
    assert (tmp_path / "d" / "webhook-secret").stat().st_mode & 0o777 == 0o600
    fixed = backend_settings(args, {"CSVIMG_WEBHOOK_SECRET": "whsec_" + "A" * 32})
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
    assert "\x1b[" in text  # a live bar: terminal control sequences
    assert re.search(r"\d+\.\d img/s", text) and re.search(r"saved [\d.]+ KiB \(", text)
    assert "progress:" not in text  # no plain lines on a terminal


def _slow_csv(tmp_path: Path, host: ImageHost, count: int, delay: float) -> Path:
    for i in range(count):
        host.add(f"/slow{i}.jpg", photo_jpeg(320, 240, seed=20 + i), content_type="image/jpeg",
                 delay=delay)
    rows = [[str(i), f"P{i}", host.url(f"/slow{i}.jpg")] for i in range(count)]
    rows.append([str(count), "Gone", host.url("/nope.jpg")])
    path = tmp_path / "slow.csv"
    path.write_bytes(make_csv(rows))
    return path


def test_process_prints_plain_progress_lines_when_not_a_terminal(
    tmp_path: Path, photo_host: ImageHost, env: dict[str, str],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_process, "PLAIN_EVERY", 0.1)
    source = _slow_csv(tmp_path, photo_host, 4, 0.25)
    argv = ["process", str(source), "--out", str(tmp_path / "out"), "--concurrency", "1"]
    assert main(argv, environ=env) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # no terminal control sequences in a file or pipe
    lines = [line for line in out.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 2, out
    pattern = re.compile(
        r"progress: (\d+)/5 images, (\d+) failed, \d+\.\d img/s, saved -?[\d.]+ (B|KiB) "
        r"\(-?[\d.]+%\)"
    )
    counts = []
    for line in lines:
        match = pattern.fullmatch(line)
        assert match, line
        counts.append(int(match[1]))
    assert counts == sorted(counts)  # monotonic
    assert "done: 4 images compressed, 1 failed" in out
    assert re.search(r"saved [\d.]+ KiB \([\d.]+%\) in [\d.]+ s \([\d.]+ img/s\)", out)


# ------------------------------------------------------------- throughput


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stats_interval_option_env_and_terminal_default() -> None:
    parser = build_parser()
    serve = parser.parse_args(["serve"])
    assert stats_interval(serve, {}, io.StringIO()) == 0  # not a terminal: off
    assert stats_interval(serve, {}, _Tty()) == DEFAULT_STATS_INTERVAL
    assert stats_interval(serve, {"CSVIMG_STATS_INTERVAL": "2.5"}, io.StringIO()) == 2.5
    assert stats_interval(serve, {"CSVIMG_STATS_INTERVAL": "0"}, _Tty()) == 0
    option = parser.parse_args(["worker", "--stats-interval", "7"])
    assert stats_interval(option, {"CSVIMG_STATS_INTERVAL": "2"}, io.StringIO()) == 7
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(UsageError):
            stats_interval(serve, {"CSVIMG_STATS_INTERVAL": bad}, io.StringIO())
    # A real terminal, as 'csvimg serve' in a shell has.
    primary, replica = pty.openpty()
    with os.fdopen(replica, "w") as tty:
        assert stats_interval(serve, {}, tty) == DEFAULT_STATS_INTERVAL
    os.close(primary)


def test_throughput_line_is_quiet_when_idle() -> None:
    from csvimg.jobs import Item, ItemResult

    tally = Tally(started=0.0)
    reporter = ThroughputLog(tally, 10, logging.getLogger("test"))
    reporter._last_at = 0.0
    assert reporter.line(now=10.0) is None
    item: Item = None  # type: ignore[assignment]  # Tally.record does not look at it
    for _ in range(8):
        tally.record(item, ItemResult(output_key="k", bytes_in=4096, bytes_out=1024))
    tally.record(item, ItemResult.failure("http-404", "gone"))
    line = reporter.line(now=20.0)
    assert line == (
        "throughput: 9 images in 10 s (0.9/s), 1 failed; saved 24.0 KiB (75.0%); "
        "since start 8 done, 1 failed"
    )
    assert reporter.line(now=30.0) is None
    assert tally.rate(now=30.0) == pytest.approx(0.3)


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_serve_logs_throughput_as_json(tmp_path: Path, photo_host: ImageHost) -> None:
    source = _slow_csv(tmp_path, photo_host, 3, 0.2)
    args = ["--log-format", "json", "--stats-interval", "0.2", "--concurrency", "1",
            "--workers", "1"]
    with ServeProcess(tmp_path / "data", env={"CSVIMG_FETCH_ALLOW": photo_host.allow},
                      args=args) as server, httpx.Client(timeout=10) as client:
        server.wait_ready()
        response = client.post(server.url + "/api/v1/upload",
                               files={"file": ("slow.csv", source.read_bytes())})
        assert response.status_code == 200, response.text
        wait_finished(client, server.url, response.json()["request_id"])
        wait_until(lambda: "since start 3 done, 1 failed" in server.log(), timeout=10,
                   what="the throughput line")
        assert server.stop() == 0
        # Every line is JSON, uvicorn's too (log() is only the tail: read the file).
        records = _json_lines(server.log_path.read_text())
    messages = [str(r["message"]) for r in records]
    throughput = [m for m in messages if m.startswith("throughput: ")]
    assert throughput and all(re.search(r"\(\d+\.\d/s\)", m) for m in throughput)
    assert any(str(r["logger"]).startswith("uvicorn") for r in records)
    assert any("upload accepted" in m for m in messages)


def test_worker_logs_throughput_in_text(tmp_path: Path, photo_host: ImageHost) -> None:
    source = _slow_csv(tmp_path, photo_host, 2, 0.1)
    data = tmp_path / "data"
    env = {"CSVIMG_FETCH_ALLOW": photo_host.allow, "CSVIMG_STATS_INTERVAL": "0.2"}
    with ServeProcess(data, env=env, args=["--workers", "0"]) as api, \
            httpx.Client(timeout=10) as client:
        api.wait_ready()
        response = client.post(api.url + "/api/v1/upload",
                               files={"file": ("slow.csv", source.read_bytes())})
        assert response.status_code == 200, response.text
        with ServeProcess(data, env=env, command="worker") as worker:
            wait_finished(client, api.url, response.json()["request_id"])
            wait_until(lambda: "since start 2 done, 1 failed" in worker.log(), timeout=10,
                       what="the throughput line")
            assert worker.stop() == 0
            assert re.search(r"INFO +csvimg\.server: throughput: \d+ images", worker.log())
        assert api.stop() == 0


# --------------------------------------------------------------- validate


def test_validate(tmp_path: Path, photo_host: ImageHost,
                  capsys: pytest.CaptureFixture[str]) -> None:
    good = _csv(tmp_path, photo_host)
    assert main(["validate", str(good)], environ={}) == 0
    assert capsys.readouterr().out.strip() == "OK: 2 rows, 4 images"

    bad_rows = tmp_path / "rows.csv"
    bad_rows.write_text("S. No.,Product Name,Input Image Urls\n1,,ftp://x/y.jpg\n1,B,\n")
    assert main(["validate", str(bad_rows)], environ={}) == 1
    out = capsys.readouterr().out
    assert out.startswith("invalid CSV: 4 problems\n")
    header = next(line for line in out.splitlines() if "code" in line)
    assert re.findall(r"\w+", header) == ["row", "column", "code", "message"]
    assert re.search(r"│ +2 │ Product Name +│ blank-product-name │ the 'Product Name' cell", out)
    assert re.search(r"│ +3 │ .* duplicate-serial", out)

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



@pytest.fixture
def keyed_api(photo_host: ImageHost) -> Iterator[ThreadServer]:
    """A server with API keys on (one key) and one image at a time."""
    from csvimg.fetch import FetchPolicy, parse_allow

    settings = Settings(fetch=FetchPolicy(allow=parse_allow(photo_host.allow)), concurrency=1)
    app = create_app(settings, workers=1, shutdown_grace=0.05, api_keys=API_KEY)
    with ThreadServer(app) as srv:
        yield srv


def _upload(server: ThreadServer, body: bytes) -> str:
    response = httpx.post(server.url + "/api/v1/upload", files={"file": ("p.csv", body)},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def test_status_with_api_key_and_watch(
    keyed_api: ThreadServer, photo_host: ImageHost, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    request_id = _upload(keyed_api, _slow_csv(tmp_path, photo_host, 4, 0.3).read_bytes())
    base = ["status", request_id, "--server", keyed_api.url]

    assert main(base, environ={}) == 1
    err = capsys.readouterr().err
    assert "401" in err and "needs an API key" in err and "CSVIMG_API_KEY" in err
    assert main([*base, "--api-key", "wrong-key-0123456789"], environ={}) == 1
    assert "refused the API key" in capsys.readouterr().err

    assert main([*base, "--watch", "--interval", "0.1"],
                environ={"CSVIMG_API_KEY": API_KEY}) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    lines = out.splitlines()
    watched = [line for line in lines if re.match(r"(PENDING|PROCESSING|COMPLETED): ", line)]
    assert len(watched) >= 2, out  # one line per change, not per poll
    assert len(watched) == len(set(watched))
    assert watched[0].split(":")[0] in ("PENDING", "PROCESSING")
    assert watched[-1] == "COMPLETED: 5/5 images (100%): 4 done, 1 failed, 5 total"
    assert re.search(r"^status +COMPLETED$", out, re.M)
    assert re.search(r"^time +took \d+\.\d s$", out, re.M)
    assert f"{keyed_api.url}/api/v1/requests/{request_id}/output.csv" in out

    # --json keeps stdout for the JSON; the key from the option wins.
    assert main([*base, "--watch", "--json", "--api-key", API_KEY],
                environ={"CSVIMG_API_KEY": "wrong-key-0123456789"}) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "COMPLETED"
    assert "COMPLETED: 5/5" in captured.err


def test_status_watch_exits_1_when_every_image_failed(
    keyed_api: ThreadServer, photo_host: ImageHost, capsys: pytest.CaptureFixture[str],
) -> None:
    request_id = _upload(keyed_api, make_csv([["1", "A", photo_host.url("/gone.jpg")]]))
    argv = ["status", request_id, "--server", keyed_api.url, "--api-key", API_KEY]
    assert main([*argv, "--watch", "--interval", "0.05"], environ={}) == 1
    assert re.search(r"^status +FAILED$", capsys.readouterr().out, re.M)
    assert main(argv, environ={}) == 0  # without --watch: the status was read


def _run_on_pty(argv: Sequence[str], env: dict[str, str], timeout: float = 30) -> str:
    primary, replica = pty.openpty()
    proc = subprocess.Popen(argv, stdout=replica, stderr=replica,
                            env={**os.environ, **env, "COLUMNS": "120"})
    os.close(replica)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert proc.wait(timeout) == 0, output
    return output.decode(errors="replace")


def test_status_watch_shows_a_bar_on_a_terminal(
    keyed_api: ThreadServer, photo_host: ImageHost, tmp_path: Path
) -> None:
    request_id = _upload(keyed_api, _slow_csv(tmp_path, photo_host, 3, 0.3).read_bytes())
    text = _run_on_pty(
        [sys.executable, "-m", "csvimg_server", "status", request_id, "--server",
         keyed_api.url, "--watch", "--interval", "0.1"],
        {"CSVIMG_API_KEY": API_KEY},
    )
    assert "\x1b[" in text and "━" in text  # a live bar
    assert re.search(r"\d/4", text)
    assert "COMPLETED" in text and "4/4 images (100%): 3 done, 1 failed" in text
