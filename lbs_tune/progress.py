"""Progress of one trial on the terminal: a redrawn bar on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

BAR_WIDTH = 24
REDRAW_S = 0.1


def summary(metrics: dict[str, Any]) -> str:
    """'epoch 2.00  lr 0.1  train/loss 0.52  val/accuracy 0.812  9,800 img/s' for one report."""
    parts = [f"epoch {metrics['epoch']:.2f}", f"lr {metrics['lr']:.4g}"]
    for key in ("train/loss", "val/accuracy", "test/accuracy"):
        value = metrics.get(key)
        if key in metrics:
            parts.append(f"{key} {value:.4f}" if value is not None else f"{key} -")
    parts.append(f"{metrics['images_per_s']:,.0f} img/s")
    if metrics.get("diverged"):
        parts.append("DIVERGED")
    return "  ".join(parts)


class Progress:
    """Shows steps done of the budget and the latest report."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last_draw = 0.0
        self.latest = ""
        self.total = 0

    def step(self, step: int, total: int) -> None:
        self.total = total
        now = time.monotonic()
        if self.tty and (now - self.last_draw > REDRAW_S or step == total):
            self.last_draw = now
            done = BAR_WIDTH * step // total
            bar = "#" * done + "." * (BAR_WIDTH - done)
            self.stream.write(f"\r[{bar}] step {step}/{total}  {self.latest}\x1b[K")
            self.stream.flush()

    def report(self, metrics: dict[str, Any]) -> None:
        self.latest = summary(metrics)
        if not self.tty:
            self.stream.write(f"step {metrics['step']}/{self.total}  {self.latest}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
