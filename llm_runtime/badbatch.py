"""Bad batches: a loss that is not finite, or spikes far above its recent level, is found on every
rank alike and rolled back; the batch is skipped from then on.

The loop keeps each step's local loss on the device and, on every step that logs or saves,
reduces all of them since the last check in the one all-reduce it already does for the logged
loss, so every rank sees the same global loss of every step (no extra collective, no host sync
in between). :class:`LossGuard` judges them, the same way on every rank: the first step whose
loss is not finite, or above the mean plus ``train.spike_sigma`` standard deviations of the last
``train.spike_window`` clean steps, is bad. The loop then rolls back to the newest clean checkpoint,
records the step in ``skipped_batches.json`` (checkpoint/skips.py) and skips that global batch:
it is read and dropped, no optimizer step runs, the LR schedule does not advance.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BadBatch", "BadBatchError", "LossGuard", "parse_steps"]


class BadBatchError(RuntimeError):
    """A bad batch that cannot be rolled back (no checkpoint before it, or train.max_rollbacks spent)."""


@dataclass(frozen=True)
class BadBatch:
    step: int
    loss: float
    reason: str


class LossGuard:
    """The recent clean losses and the verdict on new ones (deterministic: the same on every rank)."""

    def __init__(self, sigma: float, window: int):
        self.sigma, self.window = sigma, window
        self._history: deque[tuple[int, float]] = deque(maxlen=max(1, window))

    def check(self, steps: Sequence[int], losses: Sequence[float]) -> BadBatch | None:
        """The first bad step of ``steps`` (their global losses), or None; clean ones join the history."""
        for step, loss in zip(steps, losses):
            bad = self.verdict(loss)
            if bad:
                return BadBatch(step, loss, bad)
            self._history.append((step, loss))
        return None

    def verdict(self, loss: float) -> str:
        """Why ``loss`` is bad ('' when it is not)."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not self.sigma or len(self._history) < self.window:  # a spike needs a full window to judge by
            return ""
        recent = [value for _, value in self._history]
        mean, spread = statistics.fmean(recent), statistics.pstdev(recent)
        limit = mean + self.sigma * spread
        if loss > limit:
            return (f"the loss {loss:.4f} is above {limit:.4f}, the mean {mean:.4f} + {self.sigma:g} x the standard "
                    f"deviation {spread:.4f} of the last {len(recent)} steps (train.spike_sigma)")
        return ""

    def forget_after(self, step: int) -> None:
        """Drop the history past ``step`` (rolled back: those steps run again)."""
        kept = [(s, v) for s, v in self._history if s <= step]
        self._history.clear()
        self._history.extend(kept)


def parse_steps(text: str, key: str = "data.skip_steps") -> set[int]:
    """``"7,12,30-32"`` -> {7, 12, 30, 31, 32} (pure); a bad item is a ValueError naming ``key``."""
    steps: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        first, dash, last = item.partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ValueError(f"{key}={text!r}: {item!r} is not a step or a range of steps (N or N-M)") from None
        if low < 1 or high < low:
            raise ValueError(f"{key}={text!r}: {item!r} is not a step >= 1 or a range N-M with N <= M")
        steps.update(range(low, high + 1))
    return steps
