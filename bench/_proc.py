"""Child processes of the bench: started in their own process group, always stopped.

Every server the bench starts (static image host, ``csvimg serve``,
``csvimg worker``, load generators) is a `Proc`: a subprocess in a new
session (so a signal to its group reaches its children too), with its
output in a log file, stopped with SIGTERM then SIGKILL of the whole group
when the ``with`` block ends, whatever happened inside it. `ProcSet`
stops every process it was given, in reverse order, also on errors.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

__all__ = [
    "Proc",
    "ProcSet",
    "Stoppable",
    "descendants",
    "free_port",
    "proc_cpu_seconds",
    "proc_status_kb",
    "tree",
    "tree_cpu_seconds",
    "tree_status_kb",
    "wait_http",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``: peak RSS, ``VmRSS``: now)."""
    with open(f"/proc/{pid}/status") as fp:
        for line in fp:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def descendants(pid: int) -> list[int]:
    """Every live descendant of *pid* (children, grandchildren ...), from /proc."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as fp:
                    kids = [int(k) for k in fp.read().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def tree(pid: int) -> list[int]:
    """*pid* and its live descendants."""
    return [pid, *descendants(pid)]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of *pid* and its live descendants (a process gone by then is missed)."""
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(p)
    return total


def tree_status_kb(pid: int, field: str) -> dict[int, int]:
    """A ``/proc/<pid>/status`` field for *pid* and each live descendant."""
    out: dict[int, int] = {}
    for p in tree(pid):
        with contextlib.suppress(OSError, KeyError):
            out[p] = proc_status_kb(p, field)
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of *pid* so far."""
    with open(f"/proc/{pid}/stat") as fp:
        fields = fp.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class Stoppable:
    """Base of the bench's process holders: a ``with`` block ends with `stop`."""

    def stop(self) -> object:
        """Stop what this holds (subclasses)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Proc(Stoppable):
    """One child process in its own process group, logging to *log_path*."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str = "",
    ) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = log_path.open("wb")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def status_kb(self, field: str) -> int:
        return proc_status_kb(self.pid, field)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to the group, SIGKILL after *timeout*; return the exit code."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout)
            # Children left in the group (the leader may be gone already).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            if self.popen.poll() is None:
                self.popen.wait(10)
            return self.popen.returncode
        finally:
            self._log.close()


class ProcSet:
    """Stops every `Proc` added to it when the ``with`` block ends (newest first)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        while self.procs:
            proc = self.procs.pop()
            with contextlib.suppress(Exception):
                proc.stop()


def wait_http(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until *url* answers 200, failing early if *proc* exits."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready after {timeout:g} s:\n{proc.log_tail()}")
        time.sleep(0.05)
