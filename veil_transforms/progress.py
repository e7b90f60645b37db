"""Progress: a tqdm bar on a terminal; into a log (stderr not a terminal: nohup, a batch system),
one plain line every :data:`LOG_EVERY` seconds, so a long run is not silent for hours."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LOG_EVERY = 60.0  # seconds between progress lines when stderr is not a terminal


def bar(*, total=None, desc=None, unit="img", disable: bool = False, **kw):
    """A tqdm bar on stderr; plain lines when stderr is not a terminal; nothing when ``disable``."""
    if disable:
        return tqdm(total=total, disable=True)
    if not sys.stderr.isatty():
        return LogLines(total=total, desc=desc, unit=unit, unit_scale=bool(kw.get("unit_scale")))
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1, **kw)


class LogLines:
    """The part of a tqdm bar the library uses (``update``, ``n``, ``total``, a context manager), written
    as a line every ``every`` seconds: ``veiling: 12,000/300,000 img (4.0%) in 1m12s, 166 img/s, about
    28m55s left``; and a last line on close if any was written (a short run stays quiet)."""

    def __init__(self, *, total=None, desc=None, unit="img", unit_scale=False, every: float | None = None,
                 file=None):
        self.total, self.desc, self.unit, self.unit_scale = total, desc or "progress", unit, unit_scale
        self.every = LOG_EVERY if every is None else every
        self.file = file
        self.n, self.lines = 0, 0
        self.t0 = self._last = time.monotonic()

    def update(self, n=1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._write(now)

    def close(self) -> None:
        if self.lines:
            self._write(time.monotonic(), done=True)
            self.lines = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _amount(self, v) -> str:
        return tqdm.format_sizeof(v) if self.unit_scale else f"{int(v):,}"

    def _write(self, now: float, done: bool = False) -> None:
        took = now - self.t0
        rate = self.n / took if took > 0 else 0.0
        of = f"/{self._amount(self.total)}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.1f}%)" if self.total else ""
        left = ""
        if self.total and rate > 0 and not done and self.n < self.total:
            left = f", about {tqdm.format_interval((self.total - self.n) / rate)} left"
        print(f"{self.desc}: {self._amount(self.n)}{of} {self.unit}{pct} in {tqdm.format_interval(took)}, "
              f"{self._amount(rate)} {self.unit}/s{left}{' - done' if done and (not self.total or self.n >= self.total) else ''}",
              file=self.file or sys.stderr, flush=True)
        self.lines += 1
