"""A dependency-free progress bar for stderr: count, rate, ETA. Quiet when not enabled."""

from __future__ import annotations

import math
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def format_duration(seconds: float) -> str:
    """'HH:MM:SS', hours unbounded ('31:05:00' for 31 h: clock formats wrap at a day); '?' for an
    unknown (infinite, NaN or negative) span."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_bytes(n: float) -> str:
    """Sizes as people read them: '45.2 kB', '12.3 MB', '1.25 GB', '3.40 TB' (powers of 1000)."""
    for unit, scale, fmt in (("TB", 1e12, "{:.2f}"), ("GB", 1e9, "{:.2f}"), ("MB", 1e6, "{:.1f}")):
        if n >= scale:
            return f"{fmt.format(n / scale)} {unit}"
    return f"{n / 1e3:.1f} kB"


class Progress:
    """Counts work items; redraws at most every ``interval`` seconds, on one line on a TTY and
    as plain periodic lines in logs (cluster jobs)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 interval: float = 0.5, stream=None) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if self.tty else max(interval, 10.0)
        self.count = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or self.count == self.total):
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            text = (f"{self.desc}: {self.count}/{self.total} [{100 * self.count / self.total:5.1f}%] {rate:.2f} {self.unit}/s "
                    f"ETA {format_duration(eta)}")
        else:
            text = f"{self.desc}: {self.count} {self.unit} {rate:.2f} {self.unit}/s"
        return text + (f" {self.postfix}" if self.postfix else "")

    def _draw(self, now: float) -> None:
        end = "\r" if self.tty and self.count != self.total else "\n"
        self.stream.write(self.line(now) + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.count != self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()


def progress(items: Iterable[T], desc: str = "", unit: str = "it", enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(total, desc, unit, enabled)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
