"""Slow ranks named during training: the verdict (a table), the drill's busy time, and two monitors
trading real timings through a real c10d store (HashStore; the job's TCPStore in the launched tests)."""
import json
import time
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from llm_runtime.stragglers import (RankTimes, StragglerMonitor, find_stragglers, record_path, spin)


def times(*own, data=0.0):
    return [RankTimes(f"algo-{1 + rank // 2}", rank, value, data) for rank, value in enumerate(own)]


@pytest.mark.parametrize("own,factor,min_s,named", [
    ((0.10, 0.30, 0.10, 0.10), 1.5, 0.05, [1]),  # 3x the others: named
    ((0.10, 0.14, 0.10, 0.10), 1.5, 0.01, []),  # 1.4x: under the factor
    ((0.010, 0.030, 0.010, 0.010), 1.5, 0.05, []),  # 3x but 20 ms: under the floor (oversubscribed cores)
    ((0.10, 0.30), 1.5, 0.05, [1]),  # two ranks: against the other, not a median that includes itself
    ((0.10, 0.30, 0.40, 0.10), 1.5, 0.05, [2, 1]),  # slowest first
    ((0.10, 0.10, 0.10, 0.10), 1.0, 0.0, []),  # equal is never slower
    ((0.20,), 1.5, 0.05, []),  # one rank: nobody to compare with
])
def test_a_rank_is_named_only_past_both_the_factor_and_the_floor(own, factor, min_s, named):
    assert [s.rank for s in find_stragglers(times(*own), factor, min_s)] == named


def test_data_wait_counts_as_the_ranks_own_time():
    ranks = [RankTimes("algo-1", 0, 0.1, 0.0), RankTimes("algo-1", 1, 0.1, 0.0), RankTimes("algo-2", 2, 0.1, 0.4)]
    (slow,) = find_stragglers(ranks, 1.5, 0.05)
    assert (slow.name, slow.data_s, round(slow.slow_s, 6)) == ("algo-2:rank2", 0.4, 0.4)


def test_the_record_goes_beside_the_metrics_unless_set():
    assert record_path("", "/opt/ml/output/data/metrics.jsonl") == "/opt/ml/output/data/stragglers.jsonl"
    assert record_path("/x/s.jsonl", "/opt/ml/output/data/metrics.jsonl") == "/x/s.jsonl"
    assert record_path("none", "/m/metrics.jsonl") == "" and record_path("", "") == ""


def test_spin_is_busy_cpu_time_not_a_sleep():
    started = time.thread_time()
    spin(0.05, cpu=True)
    assert time.thread_time() - started >= 0.05


def config(**overrides):
    values = dict(stragglers="warn", straggler_every=3, straggler_factor=1.5, straggler_min_s=0.01, straggler_file="")
    return SimpleNamespace(**{**values, **overrides})


def run_window(monitors, busy, steps=3, first=1):
    """``steps`` steps on every monitor in turn; rank r is busy ``busy[r]`` CPU seconds per step."""
    for step in range(first, first + steps):
        for monitor in monitors:
            monitor.start()
            spin(busy[monitor.rank], cpu=True)
            monitor.stop(step, 0.0)


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_rank_0_names_the_busy_rank_from_times_posted_to_the_store(tmp_path):
    store = dist.HashStore()
    record = tmp_path / "stragglers.jsonl"
    monitors = [StragglerMonitor(config(), rank=r, world_size=3, host=f"algo-{r + 1}", store=store, device="cpu",
                                 record_file=str(record)) for r in range(3)]
    try:
        run_window(monitors, {0: 0.005, 1: 0.04, 2: 0.005})  # the warm-up window: dropped, never judged
        assert not wait_for(lambda: monitors[0].latest is not None, timeout=1.0)
        run_window(monitors, {0: 0.005, 1: 0.04, 2: 0.005}, first=4)
        assert wait_for(lambda: monitors[0].latest is not None)
        named = monitors[0].latest
        assert (named.name, named.rank) == ("algo-2:rank1", 1)
        assert named.slow_s >= 0.03
        assert monitors[1].latest is None and monitors[2].latest is None  # only rank 0 judges
        (row,) = [json.loads(line) for line in record.read_text().splitlines()]
        assert (row["straggler"], row["steps"]) == ("algo-2:rank1", [4, 6])
        assert wait_for(lambda: not store.check([f"llm_runtime/straggler/0/1/{r}" for r in range(3)]))
    finally:
        for monitor in monitors:
            monitor.close()


def test_a_clean_window_names_nobody_and_clears_an_earlier_name(tmp_path):
    store = dist.HashStore()
    monitors = [StragglerMonitor(config(), rank=r, world_size=2, host="algo-1", store=store, device="cpu")
                for r in range(2)]
    try:
        run_window(monitors, {0: 0.005, 1: 0.005})  # warm-up
        run_window(monitors, {0: 0.005, 1: 0.04}, first=4)
        assert wait_for(lambda: monitors[0].latest is not None)
        run_window(monitors, {0: 0.005, 1: 0.005}, first=7)
        assert wait_for(lambda: monitors[0].latest is None)
    finally:
        for monitor in monitors:
            monitor.close()


@pytest.mark.parametrize("overrides,world,store", [
    ({"stragglers": "off"}, 2, True), ({"straggler_every": 0}, 2, True), ({}, 1, True), ({}, 2, False)])
def test_detection_is_off_when_set_off_on_one_rank_or_without_a_store(overrides, world, store):
    monitor = StragglerMonitor(config(**overrides), rank=0, world_size=world, host="h",
                               store=dist.HashStore() if store else None, device="cpu")
    monitor.start()
    monitor.stop(3, 0.0)
    assert monitor.every == 0 and monitor._thread is None and monitor._compute == []
    monitor.close()
