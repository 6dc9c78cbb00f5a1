"""Save and stop agreed on without a collective on the hot path.

Step-count saves (``every_steps``, ``at_end``) need no agreement: every rank computes them. A
time-based save (``every_minutes``, rank 0's clock) and a stop request (any node's stop file,
written by its launcher on SIGTERM) are agreed on through the job's TCPStore instead of a
per-step all-reduce:

1. Rank 0's coordinator thread sees the need and proposes a *future* step ``T`` (its own step plus
   a margin of ``margin_s`` of its recent step time, at least 2 steps), as round ``r``.
2. Every rank's participant thread, blocked in a store wait, sees the proposal. Under a lock shared
   with the training thread it accepts only when its training loop has not yet reached ``T``'s
   boundary, and acks (``late`` counts the ranks already past it).
3. Once every rank has acked, the coordinator writes the decision: commit when none was late, else
   abort; an aborted proposal is made again with twice the margin.
4. A rank that accepted waits, at ``T``'s boundary only, for the decision its participant thread
   relays. Every other boundary costs a lock and a dict lookup.

Every wait is bounded (``timeout_s``); a rank that never acks turns the round into an abort.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["Proposal", "StepAgreement", "decision", "margin_steps", "target_step"]

log = logging.getLogger(__name__)


def margin_steps(step_s: float, margin_s: float, attempt: int = 0, *, floor: int = 2, ceiling: int = 1000) -> int:
    """Steps ahead of rank 0 for a proposal: ``margin_s`` of steps of ``step_s`` (at least ``floor``),
    doubled for each aborted attempt."""
    steps = floor if step_s <= 0 else max(floor, math.ceil(margin_s / step_s))
    return min(ceiling, steps * 2 ** attempt)


def target_step(at: int, margin: int, last_step: int) -> int:
    """The step to act after: ``margin`` past rank 0's last boundary ``at``, never past the last step."""
    return min(at + margin, last_step)


def decision(acks: int, late: int, world_size: int, timed_out: bool) -> str | None:
    """``commit`` when every rank acked in time and none was past the step; ``abort`` when one was
    late or the acks did not all come; ``None`` while they are still coming."""
    if acks >= world_size:
        return "commit" if late == 0 else "abort"
    return "abort" if timed_out else None


@dataclass(frozen=True)
class Proposal:
    step: int
    save: bool
    stop: bool
    why: str

    def dumps(self) -> str:
        return json.dumps({"step": self.step, "save": self.save, "stop": self.stop, "why": self.why})

    @classmethod
    def loads(cls, text: bytes | str) -> "Proposal":
        return cls(**json.loads(text))


CLOSED = "closed"  # written into the key a participant waits on, to wake it when the loop ends


class StepAgreement:
    """One per rank; ``boundary(step)`` is the training thread's only call on the hot path."""

    def __init__(self, store, *, rank: int, world_size: int, last_step: int, every_minutes: float = 0.0,
                 stop_file: str | None = None, poll_s: float = 0.5, margin_s: float = 0.2,
                 timeout_s: float = 300.0):
        self.rank, self.world_size, self.last_step = rank, world_size, last_step
        self.every_minutes, self.stop_file = every_minutes, stop_file
        self.poll_s, self.margin_s, self.timeout_s = poll_s, margin_s, timeout_s
        self._store = store  # the training thread's: the stop request, and waking the threads at close
        self._lock = threading.Lock()
        self._at = -1  # the last boundary the training thread passed
        self._times: deque[float] = deque(maxlen=16)  # rank 0: its recent boundaries, for the step time
        self._pending: dict[int, int] = {}  # step -> round accepted for it
        self._proposals: dict[int, Proposal] = {}
        self._decided: dict[int, threading.Event] = {}
        self._decisions: dict[int, str] = {}
        self._waiting_on = ""  # the key the participant is blocked on
        self._closed = threading.Event()
        self.last_save = time.monotonic()
        self._stop_posted, self._stop_checked = False, 0.0
        self._threads = [threading.Thread(target=self._participate, args=(store.clone(),), daemon=True,
                                          name=f"agree-rank{rank}")]
        if rank == 0:
            self._threads.append(threading.Thread(target=self._coordinate, args=(store.clone(),), daemon=True,
                                                  name="agree-coordinator"))
        for thread in self._threads:
            thread.start()

    # ---- the training thread ------------------------------------------------------------
    def boundary(self, step: int) -> tuple[bool, bool]:
        """(save, stop) agreed for ``step``: (False, False) unless a round was accepted for it."""
        now = time.monotonic()
        with self._lock:
            self._at = step
            if self.rank == 0:
                self._times.append(now)
            round_ = self._pending.pop(step, None)
        if self.stop_file and not self._stop_posted and now - self._stop_checked >= self.poll_s:
            self._stop_checked = now  # a stat at most every poll_s; the store hears of it once
            if os.path.exists(self.stop_file):
                self._store.set("request/stop", str(self.rank))
                self._stop_posted = True
        if round_ is None:
            return False, False
        if not self._decided[round_].wait(self.timeout_s):
            raise TimeoutError(f"rank {self.rank}: no decision on the save/stop proposed for step {step} within "
                               f"{self.timeout_s:g}s (comm.train_timeout_s)")
        if self._decisions[round_] != "commit":
            return False, False
        proposal = self._proposals[round_]
        return proposal.save, proposal.stop

    def saved(self) -> None:
        """A save happened (of any cadence): the time-based cadence counts from now."""
        self.last_save = time.monotonic()

    def close(self) -> None:
        """End both threads: the participant is woken by ``closed`` in the key it waits on."""
        self._closed.set()
        deadline = time.monotonic() + self.poll_s + 10
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline:
                key = self._waiting_on
                if key:
                    self._store.compare_set(key, "", CLOSED)
                thread.join(0.1)

    # ---- every rank's participant thread ------------------------------------------------
    def _wait(self, store, key: str) -> str:
        self._waiting_on = key
        store.wait([key], timedelta(days=365))  # woken by the value, or by close()'s CLOSED
        self._waiting_on = ""
        return store.get(key).decode()

    def _participate(self, store) -> None:
        round_ = 0
        while not self._closed.is_set():
            key = f"round/{round_}"
            text = self._wait(store, key)
            if text == CLOSED:
                return
            proposal = Proposal.loads(text)
            with self._lock:
                accepted = self._at < proposal.step
                if accepted:
                    self._proposals[round_], self._decided[round_] = proposal, threading.Event()
                    self._pending[proposal.step] = round_
            store.add(f"{key}/late", 0 if accepted else 1)
            store.add(f"{key}/acks", 1)
            if accepted:
                self._decisions[round_] = self._wait(store, f"{key}/decision")
                self._decided[round_].set()
            round_ += 1

    # ---- rank 0's coordinator thread ----------------------------------------------------
    def _coordinate(self, store) -> None:
        round_, attempt, stopping, acted_at = 0, 0, False, -1
        while not self._closed.wait(min(self.poll_s, 0.1)):
            with self._lock:
                at, times = self._at, list(self._times)
            if at < 0 or at <= acted_at or at >= self.last_step or stopping:
                continue  # before the first step, before the last agreed step, or after a stop
            stop = store.check(["request/stop"])
            save = bool(self.every_minutes) and (time.monotonic() - self.last_save) / 60 >= self.every_minutes
            if not (stop or save):
                continue
            step_s = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else 0.0
            proposal = Proposal(step=target_step(at, margin_steps(step_s, self.margin_s, attempt), self.last_step),
                                save=True, stop=stop, why="stop requested" if stop else "every_minutes")
            outcome = self._run_round(store, round_, proposal)
            round_ += 1
            if outcome == CLOSED:
                return
            if outcome == "commit":
                attempt, acted_at, stopping = 0, proposal.step, stop
                log.info("agreed: save%s after step %d (%s)", " and stop" if stop else "", proposal.step,
                         proposal.why)
            else:
                attempt += 1
                log.info("proposal for step %d aborted (a rank was past it); proposing again", proposal.step)

    def _run_round(self, store, round_: int, proposal: Proposal) -> str:
        key = f"round/{round_}"
        if store.compare_set(key, "", proposal.dumps()).decode() == CLOSED:
            return CLOSED  # this rank's loop ended first
        deadline = time.monotonic() + self.timeout_s
        while True:
            acks = store.add(f"{key}/acks", 0)
            outcome = decision(acks, store.add(f"{key}/late", 0), self.world_size,
                               timed_out=time.monotonic() > deadline or self._closed.is_set())
            if outcome is not None:
                return store.compare_set(f"{key}/decision", "", outcome).decode()
            time.sleep(0.005)
