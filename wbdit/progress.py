"""Training progress as one report over the whole run: steps, loss, cells/s and time left.

On a terminal it is one tqdm bar; when the output is not a terminal (cluster logs, pipes) it
is a line after the first ``FIRST_LINE_STEPS`` steps (the first estimate of the time left) and
then one every ``LINE_EVERY`` of the run, instead of carriage-return updates.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

LINE_EVERY = 0.05  # without a terminal: a line every 5% of the steps
FIRST_LINE_STEPS = 20


def duration(seconds: float) -> str:
    """``1h02m``, ``5m30s`` or ``12s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Reports ``update(step, loss)`` calls of a run of ``total`` steps that starts at step ``done``.

    ``cells_per_step`` (the global batch) turns steps/s into cells/s. Nothing is shown when not
    ``enabled``; ``stream`` defaults to stderr.
    """

    def __init__(self, total: int, done: int, cells_per_step: int, enabled: bool = True, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled, self.total, self.first, self.cells = enabled, total, done, cells_per_step
        self.t0 = time.perf_counter()
        self.next_line = min(done + FIRST_LINE_STEPS, total)
        terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (
            tqdm(total=total, initial=done, unit="step", file=self.stream, dynamic_ncols=True) if terminal else None
        )

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0  # steps/s in this process
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate * self.cells:.0f} cells/s", refresh=False)
        elif step >= self.next_line:
            eta = duration((self.total - step) / rate) if rate > 0 else "?"
            print(
                f"step {step:,}/{self.total:,} ({100 * step / self.total:.0f}%)  loss {loss:.4f}  "
                f"{rate * self.cells:.0f} cells/s  elapsed {duration(elapsed)}  ETA {eta}",
                file=self.stream,
                flush=True,
            )
            every = max(1, round(LINE_EVERY * self.total))
            self.next_line = min(self.total, (step // every + 1) * every)

    def write(self, message: str) -> None:
        """A line between updates (under the bar on a terminal)."""
        if self.bar is not None:
            tqdm.write(message, file=self.stream)
        elif self.enabled:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
