"""Slow ranks found during training: each rank times its own work, a background thread compares.

A collective evens out every rank's step time (the fast ranks wait inside it for the slow one), so
the step time cannot name a straggler. Each rank therefore times only its own work between sync
points: the training step's compute (CUDA events on a GPU, read in the background: the host runs
ahead of the device; the main thread's CPU time on CPU, which neither the waits inside FSDP's
collectives nor other processes' turns on shared cores count) and its wait for the batch. Every
``watchdog.straggler_every`` steps the window's per-step medians go to the job's store from a
background thread; rank 0 gathers them there and names a rank whose own time is more than
``watchdog.straggler_factor`` x the median of the other ranks' and at least
``watchdog.straggler_min_s`` more (:func:`find_stragglers`). No collective runs on the hot path.

A named rank appears in the metrics line and JSONL (``straggler=algo-2:rank3 slow_s=0.210``) and in
a warning; with ``watchdog.stragglers=fail`` the job exits ``exitcodes.BAD_NODE`` (87) with a
failure record naming the host, for an orchestrator that replaces hosts.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import exitcodes
from .failures import FailureRecord, write_record
from .workerenv import restart_count

__all__ = ["RankTimes", "Straggler", "StragglerMonitor", "find_stragglers", "monitor_for_run", "record_path",
           "slow_drill", "spin"]

log = logging.getLogger(__name__)
POLL_S = 0.2
GATHER_TIMEOUT_S = 120.0
"""How long rank 0 waits for a window's times from every rank (they run in step; a rank that stops
posting is the watchdog's to name)."""


@dataclass(frozen=True)
class RankTimes:
    """One rank's per-step medians over a window."""

    host: str
    rank: int
    compute_s: float
    data_s: float

    @property
    def own_s(self) -> float:
        return self.compute_s + self.data_s


@dataclass(frozen=True)
class Straggler:
    host: str
    rank: int
    own_s: float
    median_s: float
    """The median own time of the other ranks."""
    compute_s: float
    data_s: float

    @property
    def name(self) -> str:
        return f"{self.host}:rank{self.rank}"

    @property
    def slow_s(self) -> float:
        return self.own_s - self.median_s


def find_stragglers(times: Sequence[RankTimes], factor: float, min_s: float) -> list[Straggler]:
    """The ranks slower than the median of the others by both ``factor`` and ``min_s``, slowest
    first (pure). The others' median, not everyone's: with two ranks the slow one is half of it."""
    found = []
    for mine in times:
        others = [t.own_s for t in times if t.rank != mine.rank]
        if not others:
            continue
        median = statistics.median(others)
        if mine.own_s > factor * median and mine.own_s - median >= min_s:
            found.append(Straggler(mine.host, mine.rank, mine.own_s, median, mine.compute_s, mine.data_s))
    return sorted(found, key=lambda s: (-s.slow_s, s.rank))


def spin(seconds: float, cpu: bool) -> None:
    """Busy for ``seconds``: CPU time of this thread on CPU (a slower core, not a sleep), wall time
    on a GPU host (the device idles between the step's events). The ``slow`` drill at phase=step."""
    clock = time.thread_time if cpu else time.perf_counter
    until = clock() + seconds
    while clock() < until:
        pass


def record_path(straggler_file: str, metrics_jsonl: str) -> str:
    """Where rank 0 appends named stragglers: the setting, else beside the metrics JSONL (pure)."""
    if straggler_file:
        return "" if straggler_file == "none" else straggler_file
    return os.path.join(os.path.dirname(metrics_jsonl), "stragglers.jsonl") if metrics_jsonl else ""


def slow_drill(factor: float, cpu_started: float, wall_started: float, cuda: bool) -> None:
    """The ``slow:rank=N,factor=F,phase=step`` drill: stretch the step just computed to F x its time
    (on a GPU the drilled rank waits for its device first: a drill may sync)."""
    if cuda:
        import torch

        torch.cuda.synchronize()
        spin((factor - 1) * (time.perf_counter() - wall_started), cpu=False)
    else:
        spin((factor - 1) * (time.thread_time() - cpu_started), cpu=True)


def monitor_for_run(rt) -> "StragglerMonitor":
    """This worker's monitor (off on one rank, or without the job's store)."""
    cfg = rt.config.watchdog
    return StragglerMonitor(cfg, rank=rt.rank, world_size=rt.world_size,
                            host=rt.cluster.current_host or "localhost", store=rt.watchdog.store, device=rt.device,
                            output_dir=rt.paths.output_dir,
                            record_file=record_path(cfg.straggler_file, rt.paths.metrics_jsonl))


class StragglerMonitor:
    """Times this rank's steps (:meth:`start` / :meth:`stop`, on the main thread, cheap) and hands
    each window to a background thread that posts it and, on rank 0, judges it."""

    def __init__(self, cfg, *, rank: int, world_size: int, host: str, store, device, output_dir: str = "",
                 record_file: str = ""):
        self.cfg, self.rank, self.host, self.store, self.output_dir = cfg, rank, host, store, output_dir
        self.record_file = record_file
        self.world_size = world_size
        self.every = cfg.straggler_every if cfg.stragglers != "off" and world_size > 1 and store is not None else 0
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self.device = device
        self._windows = 0  # windows handed off: the same count on every rank (all ranks roll back alike)
        self._warmed = False
        self.latest: Straggler | None = None
        """Rank 0: the slowest rank named in the last judged window (None: none)."""
        self._compute: list = []
        self._data: list[float] = []
        self._started = None
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._closed = threading.Event()
        self._named: str | None = None
        self._prefix = f"llm_runtime/straggler/{restart_count()}/"
        self._thread = None
        if self.every:
            self._thread = threading.Thread(target=self._run, name="llm-runtime-stragglers", daemon=True)
            self._thread.start()

    # ---- the training loop's side ----------------------------------------------------------
    def start(self) -> None:
        if not self.every:
            return
        if self.cuda:
            import torch

            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.thread_time()

    def stop(self, step: int, data_wait_s: float) -> None:
        """The step's compute ends; every ``straggler_every`` steps the window goes to the thread."""
        if not self.every or self._started is None:
            return
        if self.cuda:
            import torch

            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self._compute.append((self._started, ended))
        else:
            self._compute.append(time.thread_time() - self._started)
        self._data.append(data_wait_s)
        self._started = None
        if step % self.every == 0:
            if not self._warmed:  # the first window after start is warm-up (allocator, lazy init, first
                self._warmed = True  # collectives), and it differs between ranks: every rank drops it alike
                self._compute, self._data = [], []
                return
            self._windows += 1  # not step // every: a rollback replays steps, and their keys must not repeat
            window = (self._windows, step, self._compute, self._data)
            self._compute, self._data = [], []
            try:
                self._queue.put_nowait(window)
            except queue.Full:  # the thread is behind (a store far away): this window is not judged
                pass

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_S * 5)

    # ---- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self.cuda:  # this thread's CUDA calls on this rank's device (not a context on GPU 0)
            import torch

            torch.cuda.set_device(self.device)
        while not self._closed.is_set():
            try:
                window, step, compute, data = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            try:
                self._window(window, step, compute, data)
            except Exception as err:  # noqa: BLE001 - detection must never stop training
                if not self._closed.is_set():
                    log.warning("straggler detection: window ending at step %d not judged: %s", step, err)

    def _window(self, window: int, step: int, compute: list, data: list[float]) -> None:
        if self.cuda:  # events complete in order: wait here, in the background, not on the main thread
            for started, ended in compute:
                ended.synchronize()
            compute = [started.elapsed_time(ended) / 1000 for started, ended in compute]
        mine = RankTimes(self.host, self.rank, statistics.median(compute), statistics.median(data))
        self.store.set(f"{self._prefix}{window}/{self.rank}", json.dumps(mine.__dict__))
        if self.rank != 0:
            return
        times = self._gather(window)
        if times is None:
            return
        found = find_stragglers(times, self.cfg.straggler_factor, self.cfg.straggler_min_s)
        self._report(found, step)
        self.latest = found[0] if found else None  # published after the record: a reader of latest sees it

    def _gather(self, window: int) -> list[RankTimes] | None:
        keys = [f"{self._prefix}{window}/{rank}" for rank in range(self.world_size)]
        deadline = time.monotonic() + GATHER_TIMEOUT_S
        while not self.store.check(keys):
            if self._closed.is_set():
                return None
            if time.monotonic() > deadline:
                log.warning("straggler detection: not every rank posted its times for window %d within %.0f s; "
                            "skipped", window, GATHER_TIMEOUT_S)
                for key in keys:
                    if self.store.check([key]):
                        self.store.delete_key(key)
                return None
            time.sleep(POLL_S)
        times = [RankTimes(**json.loads(self.store.get(key))) for key in keys]
        for key in keys:
            self.store.delete_key(key)
        return times

    def _report(self, found: list[Straggler], step: int) -> None:
        first = step - self.every + 1
        for slow in found:
            log.warning("straggler: %s is slower than the other ranks over steps %d-%d: its own time %.4f s per "
                        "step (compute %.4f s, data wait %.4f s) against their median %.4f s (slow_s=%.4f)",
                        slow.name, first, step, slow.own_s, slow.compute_s, slow.data_s, slow.median_s, slow.slow_s)
        if found and self.record_file:
            self._append(found, first, step)
        named = found[0].name if found else None
        if named is None and self._named is not None:
            log.info("straggler: no rank is slower than the others over steps %d-%d", first, step)
        self._named = named
        if found and self.cfg.stragglers == "fail":
            self._fail(found[0], step)

    def _append(self, found: list[Straggler], first: int, step: int) -> None:
        try:
            os.makedirs(os.path.dirname(self.record_file) or ".", exist_ok=True)
            with open(self.record_file, "a") as sink:
                for slow in found:
                    sink.write(json.dumps({"steps": [first, step], "straggler": slow.name, "host": slow.host,
                                           "rank": slow.rank, "slow_s": slow.slow_s, "own_s": slow.own_s,
                                           "median_s": slow.median_s, "compute_s": slow.compute_s,
                                           "data_s": slow.data_s, "time": time.time()}) + "\n")
        except OSError as err:
            log.warning("straggler detection: could not append to %s: %s", self.record_file, err)

    def _fail(self, slow: Straggler, step: int) -> None:
        reason = (f"straggler {slow.name}: own time {slow.own_s:.4f} s per step against the other ranks' median "
                  f"{slow.median_s:.4f} s over steps {step - self.every + 1}-{step} (watchdog.stragglers=fail)")
        record = FailureRecord("straggler", slow.host, slow.rank, step, "step", reason)
        log.error("%s", record.line())
        write_record(self.output_dir, self.rank, record, record)
        for handler in logging.getLogger("llm_runtime").handlers:
            handler.flush()
        os._exit(exitcodes.BAD_NODE)
