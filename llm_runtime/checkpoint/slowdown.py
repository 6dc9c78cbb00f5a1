"""The hidden cost of a save: training time lost while its background write and upload run.

``blocked_s`` is the time the training thread waits for a save. The background work (DCP's
write, the node tar, the upload) then competes with training for cores, memory bandwidth and
the GIL, so the steps that run meanwhile are slower. ``slowdown_s`` is that loss: for each step
that started with a save in flight, its time above the median of recent steps that did not
(their blocked time taken out), summed until the save's commit is in.
"""
from __future__ import annotations

import statistics
from collections import deque

__all__ = ["SlowdownMeter"]


class SlowdownMeter:
    def __init__(self, window: int = 32, min_clean: int = 3):
        self.clean: deque[float] = deque(maxlen=window)
        self.min_clean = min_clean
        self._last: float | None = None
        self._in_flight = False

    def boundary(self, now: float, in_flight: bool, blocked_s: float = 0.0) -> float:
        """At a step boundary (``now``, monotonic): :meth:`end` of the step just run, then
        :meth:`begin` of the next one with a save ``in_flight`` or not."""
        lost = self.end(now, blocked_s)
        self.begin(in_flight)
        return lost

    def end(self, now: float, blocked_s: float = 0.0) -> float:
        """The step just ended: its time lost to a save, 0 if it started with none in flight or too
        few clean steps are known. ``blocked_s``: what it spent blocked in a save (counted elsewhere)."""
        lost = 0.0
        if self._last is not None:
            took = max(0.0, now - self._last - blocked_s)
            if not self._in_flight:
                self.clean.append(took)
            elif len(self.clean) >= self.min_clean:
                lost = max(0.0, took - statistics.median(self.clean))
        self._last = now
        return lost

    def begin(self, in_flight: bool) -> None:
        """Whether a save runs in the background during the step that starts now."""
        self._in_flight = in_flight
