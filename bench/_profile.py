"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) as text.

``python -m bench._profile bench/_work/profiles/e2e-2MP-jpeg.txt [--top 30]``
prints the functions with the most samples on top of the stack (self), the
most samples anywhere in the stack (inclusive) and the samples per thread.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
from pathlib import Path

__all__ = ["summarize"]

_THREAD = re.compile(r"^(thread|process) \(")
# Leaf frames that mean "waiting", which py-spy's idle detection lets through.
_IDLE = (
    "Condition.wait (threading.py)",
    "EpollSelector.select (selectors.py)",
    "Event.wait (threading.py)",
)


def _frames(stack: str) -> list[str]:
    frames = stack.split(";")
    return [re.sub(r":\d+\)$", ")", f) for f in frames]


def summarize(path: Path, top: int = 25, match: str | None = None, idle: bool = False) -> str:
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = _frames(stack)
        thread = "?"
        while frames and _THREAD.match(frames[0]):
            thread = frames.pop(0)
        if match and not any(match in f for f in frames):
            continue
        if not idle and frames and frames[-1] in _IDLE:
            continue
        total += count
        threads[thread] += count
        if frames:
            self_count[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    out = [f"{path}: {total} samples"]
    for title, counter in (("self", self_count), ("inclusive", incl), ("threads", threads)):
        out.append(f"\n-- {title} --")
        for name, count in counter.most_common(top):
            out.append(f"{100 * count / max(1, total):5.1f}%  {count:6d}  {name[:150]}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="only stacks with a frame containing this text")
    parser.add_argument("--idle", action="store_true", help="keep samples of waiting threads")
    args = parser.parse_args()
    with contextlib.suppress(BrokenPipeError):  # | head
        print(summarize(args.path, args.top, args.match, args.idle))


if __name__ == "__main__":
    main()
