"""The hang watchdog: a thread in every worker that turns a stall into a prompt, explained exit.

The training loop reports each phase as it enters it (``beat(step, phase)``): ``data`` (waiting
for the batch), ``step`` (forward/backward/optimizer), ``checkpoint`` (the blocking part of a
save or restore), ``start`` / ``export``. When a phase makes no progress within its timeout
(:func:`phase_timeout`: fixed, or a multiple of the median step time with a floor), the
watchdog dumps every thread's stack, trades a short record with the other stalled ranks over the
job's store to name a suspect (a rank stuck outside a collective, while the others wait inside
one), writes a one-line failure record to the log and to the output dir (on SageMaker
``/opt/ml/output/failure``, which SageMaker shows as the job's failure reason), and exits with
``exitcodes.STALLED``. The launcher then exits with the same code and tears the job down.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict

from . import exitcodes
from .config import WatchdogConfig
from .failures import (FailureRecord, dump_stacks, is_collective_timeout, log_nccl_warnings, lost_peer, suspects,
                       where, write_record)
from .workerenv import restart_count

__all__ = ["Watchdog", "collective_cap", "phase_timeout"]

log = logging.getLogger(__name__)
_TIMED = ("data", "step", "eval")  # eval: each held-out batch, timed like a step

# The timing of a failure, after watchdog.exchange_s (the records' exchange) has run out:
COLLECTIVE_MARGIN_S = 20.0
"""Spoken this long before comm.train_timeout_s: trading and writing records must end before the
collective's own timeout kills the process (NCCL TearDown runs no Python)."""
MIN_COLLECTIVE_CAP_S = 10.0
BACKSTOP_S = 30.0
"""A failing rank exits at the latest this long after exchange_s, whatever blocks its record writing."""
SECOND_FAILURE_WAIT_S = 45.0
"""A second failure in a rank that is already failing waits (past exchange_s) for the first to exit
the process; longer than BACKSTOP_S, so the first one's exit always wins."""
EXCHANGE_JOIN_MARGIN_S = 5.0
"""The exchange thread gets this long past exchange_s before it is abandoned (a store gone with its host)."""
LOST_PEER_WAIT_S = 2.0
LOST_PEER_WAIT_MAX_S = 15.0
"""A rank that lost a peer waits exchange_s + LOST_PEER_WAIT_S (at most LOST_PEER_WAIT_MAX_S) before
writing, so that the culprit's record is the host's."""
WRITTEN_WAIT_S = 5.0
WRITTEN_JOIN_S = 7.0
"""How long the stalled ranks wait for each other's records to be written before the first exits."""


def phase_timeout(phase: str, cfg: WatchdogConfig, durations: Sequence[float], checkpoint_s: float,
                  cap_s: float = float("inf")) -> float | None:
    """Seconds ``phase`` may go without progress; None = unwatched (before the first beat, after the last).

    Phases whose peers wait in a training collective are capped at ``cap_s``, a little under
    comm.train_timeout_s: past it the peers' collectives fail anyway (with NCCL's TearDown error
    handling, torch kills the process before any Python code runs), so the watchdog must speak
    first. The checkpoint phase waits on the checkpoint group, whose timeout is the upload's.
    """
    if phase in _TIMED:
        if cfg.step_timeout_s > 0:
            limit = cfg.step_timeout_s
        elif len(durations) < max(1, cfg.warmup_steps):
            limit = cfg.first_timeout_s
        else:
            limit = max(cfg.floor_s, cfg.multiple * statistics.median(durations))
        return min(limit, cap_s)
    if phase == "checkpoint":
        return cfg.checkpoint_timeout_s or checkpoint_s
    if phase in ("start", "export", "health"):
        return min(cfg.first_timeout_s, cap_s)
    return None


def collective_cap(train_timeout_s: float, exchange_s: float) -> float:
    """The watchdog's limit for phases whose peers wait in a collective: time to trade records and
    write them before the collective timeout ends the process."""
    return max(MIN_COLLECTIVE_CAP_S, train_timeout_s - exchange_s - COLLECTIVE_MARGIN_S)


class Watchdog:
    def __init__(self, cfg: WatchdogConfig, *, rank: int, world_size: int, host: str, output_dir: str = "",
                 checkpoint_s: float = 2100.0, cap_s: float = float("inf"), store=None, poll_s: float = 1.0):
        self.cfg, self.rank, self.world_size, self.host = cfg, rank, world_size, host
        self.cap_s = cap_s
        self.output_dir, self.checkpoint_s, self.store, self.poll_s = output_dir, checkpoint_s, store, poll_s
        self.durations: deque[float] = deque(maxlen=100)
        self._lock = threading.Lock()
        self._state = (0, "idle", time.monotonic(), None)  # step, phase, since, timeout override
        self._step_started: float | None = None
        self._failing = threading.Event()
        self._stop = threading.Event()
        self._main = threading.main_thread()
        self._thread: threading.Thread | None = None
        if cfg.enabled:
            self._thread = threading.Thread(target=self._run, name="llm-runtime-watchdog", daemon=True)
            self._thread.start()

    # ---- what the training loop calls -----------------------------------------------------
    def beat(self, step: int, phase: str, timeout_s: float | None = None) -> None:
        """Entering ``phase`` of ``step`` (progress); a ``data`` beat also times the previous step.
        ``timeout_s`` replaces the phase's limit (uncapped: for waits outside collectives)."""
        now = time.monotonic()
        if phase == "data":
            if self._step_started is not None:
                self.durations.append(now - self._step_started)
            self._step_started = now
        with self._lock:
            self._state = (step, phase, now, timeout_s)

    def pause(self) -> None:
        """Between phases that are not watched (a checkpoint restore resets the step timing too)."""
        self._step_started = None
        with self._lock:
            self._state = (self._state[0], "idle", time.monotonic(), None)

    def write_record(self, record: FailureRecord) -> None:
        """Write a failure found elsewhere (the health check's verdict) as this rank's and the host's record."""
        write_record(self.output_dir, self.rank, record, record)

    def close(self) -> None:
        self._stop.set()
        self.pause()

    def fail(self, reason: str, *, phase: str | None = None, stalled_s: float = 0.0, timeout_s: float = 0.0,
             frame=None, code: int = exitcodes.STALLED) -> None:
        """Record a stall found elsewhere (a deadline, a timed-out collective) and exit with ``code``."""
        step, current, since, _ = self._state
        self._stall(step, phase or current, stalled_s or time.monotonic() - since, timeout_s, reason,
                    frame if frame is not None else sys._current_frames().get(self._main.ident), code)

    def on_error(self, err: BaseException) -> None:
        """The training thread is dying of ``err``: a timeout is a stall (exits here); any other
        error gets a failure record and goes on to its traceback."""
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            return
        if self._failing.is_set():  # the watchdog is on its way out: let it finish (it exits the process)
            time.sleep(self.cfg.exchange_s + SECOND_FAILURE_WAIT_S)
            return
        first = (str(err).strip().splitlines() or [""])[0][:300]
        if is_collective_timeout(err):
            tb = err.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            self.fail(f"{type(err).__name__}: {first}", frame=tb.tb_frame if tb is not None else None)
        log_nccl_warnings()
        step, phase, _, _ = self._state
        record = FailureRecord("error", self.host, self.rank, step, phase, f"{type(err).__name__}: {first}")
        if lost_peer(err):  # an effect: give the rank that caused it time to write the host's record first
            time.sleep(min(self.cfg.exchange_s + LOST_PEER_WAIT_S, LOST_PEER_WAIT_MAX_S))
        write_record(self.output_dir, self.rank, record, record)

    # ---- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                step, phase, since, override = self._state
            timeout = override or phase_timeout(phase, self.cfg, self.durations, self.checkpoint_s, self.cap_s)
            stalled = time.monotonic() - since
            if timeout is not None and stalled > timeout:
                self._stall(step, phase, stalled, timeout, "no progress within the phase's timeout",
                            sys._current_frames().get(self._main.ident), exitcodes.STALLED)

    def _claim(self) -> bool:
        """The first thread to fail owns the exit; any other waits for it (bounded by its backstop)."""
        with self._lock:
            if self._failing.is_set():
                first = False
            else:
                self._failing.set()
                first = True
        if not first:
            time.sleep(self.cfg.exchange_s + SECOND_FAILURE_WAIT_S)
        return first

    def _stall(self, step: int, phase: str, stalled_s: float, timeout_s: float, reason: str, frame,
               code: int) -> None:
        if not self._claim():
            os._exit(code)
        backstop = threading.Timer(self.cfg.exchange_s + BACKSTOP_S, os._exit, (code,))  # whatever blocks below
        backstop.daemon = True
        backstop.start()
        try:
            spot, in_collective = where(frame)
            record = FailureRecord("stalled", self.host, self.rank, step, phase, reason, stalled_s, timeout_s,
                                   spot, in_collective)
            log.error("%s; stacks of every thread follow", record.line())
            _flush()
            dump_stacks(sys.stderr)
            log_nccl_warnings()
            records = self._exchange(asdict(record))
            record.suspects = suspects(records, self.world_size)
            # The host's record describes the first suspect (as every stalled rank saw it), whoever writes it.
            reported = [r for r in records if r["rank"] in record.suspects]
            blamed = min(reported, key=lambda r: (r["time"], r["rank"])) if reported else asdict(record)
            summary = FailureRecord(**{**blamed, "suspects": record.suspects})
            if not reported:  # the suspects never reported: say so, from this rank's view
                summary.reason = f"ranks {','.join(map(str, record.suspects))} stopped reporting; {summary.reason}"
            write_record(self.output_dir, self.rank, record, summary, stacks=True)
            log.error("failure record: %s", summary.line())
            _flush()
            self._written(len(records))  # the first rank to exit gets the others torn down: let them write first
        finally:
            os._exit(code)

    def _exchange(self, mine: dict) -> list[dict]:
        """Every stalled rank's record, gathered over the job's store for ``exchange_s`` (bounded)."""
        if self.store is None or self.world_size == 1:
            return [mine]
        seen: dict[int, dict] = {}

        def trade() -> None:
            prefix = _stall_prefix()
            index = self.store.add(prefix + "n", 1)
            self.store.set(f"{prefix}{index}", json.dumps(mine))
            deadline = time.monotonic() + self.cfg.exchange_s
            while True:
                count = self.store.add(prefix + "n", 0)
                for i in range(1, count + 1):
                    if i not in seen and self.store.check([f"{prefix}{i}"]):
                        seen[i] = json.loads(self.store.get(f"{prefix}{i}"))
                if len(seen) >= self.world_size or time.monotonic() >= deadline:
                    return
                time.sleep(0.2)

        worker = threading.Thread(target=lambda: _quietly(trade), daemon=True, name="llm-runtime-stall-exchange")
        worker.start()
        worker.join(self.cfg.exchange_s + EXCHANGE_JOIN_MARGIN_S)
        records = list(seen.values())
        return records if any(r.get("rank") == self.rank for r in records) else records + [mine]

    def _written(self, expected: int) -> None:
        """Wait (briefly, bounded) until the ``expected`` stalled ranks have written their records."""
        if self.store is None or expected < 2:
            return
        key = _stall_prefix() + "written"

        def wait() -> None:
            self.store.add(key, 1)
            deadline = time.monotonic() + WRITTEN_WAIT_S
            while self.store.add(key, 0) < expected and time.monotonic() < deadline:
                time.sleep(0.1)

        worker = threading.Thread(target=lambda: _quietly(wait), daemon=True, name="llm-runtime-stall-written")
        worker.start()
        worker.join(WRITTEN_JOIN_S)


def _stall_prefix() -> str:
    """Store keys of this attempt's stall exchange (a restarted job trades afresh)."""
    return f"llm_runtime/stall/{restart_count()}/"


def _quietly(fn) -> None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the store may be gone with its host; blame ourselves alone
        log.warning("could not trade stall records over the store: %s", err)


def _flush() -> None:
    for handler in logging.getLogger("llm_runtime").handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
