"""Save and stop agreed through the job's store, with no collective on the hot path.

Ranks are threads here, each with its own TCPStore client to a real TCPStore server on 127.0.0.1;
a threading.Barrier per step stands in for the collectives that keep real ranks in lockstep.
"""
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from llm_runtime.checkpoint.agree import StepAgreement, decision, margin_steps, target_step


@pytest.mark.parametrize("step_s,margin_s,attempt,expected", [
    (0.0, 0.2, 0, 2),      # no step time yet: the floor
    (1.0, 0.2, 0, 2),      # slow steps: the floor
    (0.01, 0.2, 0, 20),    # fast steps: 0.2 s of them
    (0.01, 0.2, 2, 80),    # each aborted attempt doubles it
    (1e-6, 0.2, 5, 1000),  # capped
])
def test_a_proposal_lies_margin_seconds_of_steps_ahead(step_s, margin_s, attempt, expected):
    assert margin_steps(step_s, margin_s, attempt) == expected


@pytest.mark.parametrize("at,margin,last,expected", [(5, 2, 100, 7), (99, 2, 100, 100), (100, 4, 100, 100)])
def test_a_proposed_step_is_never_past_the_last_step(at, margin, last, expected):
    assert target_step(at, margin, last) == expected


@pytest.mark.parametrize("acks,late,world,timed_out,expected", [
    (4, 0, 4, False, "commit"), (4, 1, 4, False, "abort"), (3, 0, 4, False, None), (3, 0, 4, True, "abort"),
])
def test_a_round_commits_only_when_every_rank_acked_in_time(acks, late, world, timed_out, expected):
    assert decision(acks, late, world, timed_out) == expected


@pytest.fixture
def server():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield store


def _client(server, prefix="job/"):
    return dist.PrefixStore(prefix, dist.TCPStore("127.0.0.1", server.port, is_master=False,
                                                 timeout=timedelta(seconds=30)))


def _run_ranks(server, world, steps, *, step_s=0.01, lockstep=None, stop_file=None, every_minutes=0.0,
               stop_at=None, margin_s=0.05, last_for=None):
    """Each rank's loop: {rank: [(step, save, stop), ...] of the steps that acted}."""
    lockstep = set(range(world)) if lockstep is None else lockstep
    barrier = threading.Barrier(len(lockstep), timeout=30)
    acted, errors = {r: [] for r in range(world)}, []
    agreements = [StepAgreement(_client(server), rank=r, world_size=world, last_step=steps, stop_file=stop_file,
                                every_minutes=every_minutes, poll_s=0.05, margin_s=margin_s, timeout_s=30)
                  for r in range(world)]

    def loop(rank):
        try:
            for step in range(1, (last_for or {}).get(rank, steps) + 1):
                if rank in lockstep:
                    time.sleep(step_s)
                    barrier.wait()
                if rank == 0 and stop_at == step:
                    open(stop_file, "w").close()
                save, stop = agreements[rank].boundary(step)
                if save or stop:
                    acted[rank].append((step, save, stop))
                    agreements[rank].saved()
                if stop:
                    return
        except BaseException as err:  # noqa: BLE001 - shipped to the test thread
            errors.append((rank, err))
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for agreement in agreements:
        agreement.close()
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert not any(t.is_alive() for a in agreements for t in a._threads), "an agreement thread outlived close()"
    return acted


def test_a_stop_file_on_one_node_stops_every_rank_after_the_same_later_step(server, tmp_path):
    acted = _run_ranks(server, 4, 200, stop_file=str(tmp_path / "stop"), stop_at=20)
    stops = {r: a[-1][0] for r, a in acted.items()}
    assert len(set(stops.values())) == 1, stops
    assert 20 < stops[0] < 200, stops
    assert all(a == [(stops[0], True, True)] for a in acted.values()), acted


def test_time_based_saves_land_on_the_same_steps_on_every_rank(server):
    acted = _run_ranks(server, 3, 120, every_minutes=0.1 / 60)  # every 0.1 s of 0.01 s steps
    assert len(acted[0]) >= 3, acted
    assert acted[0] == acted[1] == acted[2], acted
    assert all(save and not stop for _, save, stop in acted[0])


def test_a_proposal_some_rank_is_already_past_is_aborted_and_made_again_further_ahead(server, tmp_path, caplog):
    caplog.set_level("INFO", logger="llm_runtime.checkpoint.agree")
    # Rank 1 is not held back by the others: it has passed step 40 before rank 0's first proposal,
    # so every proposal up to 40 must abort (a commit there would leave rank 1 out of the save).
    world, steps = 3, 400
    stop_file = tmp_path / "stop"
    stop_file.touch()
    acted = _run_ranks(server, world, steps, lockstep={0, 2}, stop_file=str(stop_file), step_s=0.005,
                       last_for={1: 40})
    assert acted[1] == [], acted
    stopped = acted[0][-1][0]
    assert acted[0] == acted[2] == [(stopped, True, True)], acted
    assert 40 < stopped < steps, acted
    assert "aborted (a rank was past it)" in caplog.text


def test_no_rank_acts_when_nothing_was_requested(server):
    acted = _run_ranks(server, 2, 30)
    assert acted == {0: [], 1: []}


def test_a_checkpointers_step_boundary_runs_no_collective_when_no_save_is_due(tmp_path, monkeypatch):
    # The hot path of a job with checkpoints on: a lock and a lookup, never a collective (a plain
    # loop has none). One real gloo process group of one rank; every collective is made to fail.
    from llm_runtime.checkpoint.manager import Checkpointer
    from llm_runtime.config import load_config

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = load_config(cli=[("checkpoint.local_dir", str(tmp_path)), ("checkpoint.every_steps", "1000"),
                                  ("checkpoint.every_minutes", "60"), ("train.steps", "100")])
        checkpointer = Checkpointer(config, rank=0, world_size=1, local_rank=0, node_rank=0, num_nodes=1,
                                    backend="fsdp", local_dir=str(tmp_path))
        called = []
        for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
                     "barrier", "reduce", "gather", "scatter", "all_to_all"):
            monkeypatch.setattr(dist, name, lambda *a, _name=name, **k: called.append(_name))
        decisions = [checkpointer.step_boundary(step, 100) for step in range(1, 51)]
        monkeypatch.undo()
        assert decisions == [(False, False)] * 50 and called == []
        checkpointer.close()
    finally:
        dist.destroy_process_group()
