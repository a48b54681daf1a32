"""Evaluation progress on rank 0: samples done / total, samples per second, ETA, failed so far.

On a terminal it is a tqdm bar (redrawn in place). When the stream is not a terminal (a log file,
a pipe, a batch system) a bar would write a carriage-return update per sample, so instead one
plain line is logged every ``interval_s`` seconds, plus a last line at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)


class Progress:
    """Counts finished samples of one setting on this rank.

    Args:
        total: samples this rank will evaluate (skipped ones excluded).
        desc: label (the setting's name).
        enabled: False: nothing is shown (``progress=false``, or ranks other than 0).
        stream: where the bar goes (default stderr); its ``isatty()`` picks bar or log lines.
        interval_s: seconds between log lines when ``stream`` is not a terminal.
        clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.enabled = total, desc, enabled and total > 0
        self.done = self.failed = 0
        self.interval_s, self.clock = float(interval_s), clock
        self.start = self.last = clock()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if self.enabled and _isatty(stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="sample", file=stream, dynamic_ncols=True)

    def update(self, failed: bool) -> None:
        """One sample finished (``failed``: recorded as failed)."""
        self.done += 1
        self.failed += int(failed)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
            return
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            log.info("%s", self.line())

    def line(self) -> str:
        """``<desc>: 12/40 samples (30%), 2.5 samples/s, ETA 0:00:11, 1 failed``."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = "?" if eta == float("inf") else time.strftime("%H:%M:%S", time.gmtime(eta))
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.desc}: {self.done}/{self.total} samples ({percent:.0f}%), {rate:.2f} samples/s, "
                f"ETA {eta_text}, {self.failed} failed")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            log.info("%s (done)", self.line())


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
