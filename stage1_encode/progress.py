"""The job's progress: a tqdm bar on a terminal, a log line every interval otherwise."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("stage1_encode")


class Progress:
    """tqdm on a terminal; otherwise a plain log line every `interval_s` seconds. Counts settled input rows."""

    def __init__(self, total: int, enabled: bool, interval_s: float) -> None:
        self.total, self.done, self.written, self.rejected = total, 0, 0, 0
        self.t0 = time.time()
        self.last_log = self.t0
        self.interval_s = interval_s
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="sample", dynamic_ncols=True, desc="encode", smoothing=0.1)

    def update(self, written: int, rejected: int) -> None:
        self.written += written
        self.rejected += rejected
        self.done += written + rejected
        if self.bar is not None:
            self.bar.update(written + rejected)
            self.bar.set_postfix(rejected=self.rejected, refresh=False)
        elif time.time() - self.last_log >= self.interval_s:
            self.last_log = time.time()
            logger.info(self.line())

    def line(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (
            f"progress {self.done}/{self.total} inputs ({self.written} written, {self.rejected} rejected), "
            f"{rate:.2f} samples/s, ETA {eta:.0f}s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
