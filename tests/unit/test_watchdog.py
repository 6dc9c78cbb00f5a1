"""The watchdog's decisions (timeouts, blame, records) and its exit in a real process."""
import json
import subprocess
import sys
import textwrap

import pytest

from llm_runtime import exitcodes
from llm_runtime.config import WatchdogConfig
from llm_runtime.failures import FailureRecord, is_collective_timeout, suspects
from llm_runtime.watchdog import phase_timeout


@pytest.mark.parametrize("phase,cfg,durations,expected", [
    ("step", {}, [], 1800.0),                                   # nothing timed yet: the start-up allowance
    ("data", {}, [1.0, 1.0], 1800.0),                           # fewer than warmup_steps timings
    ("step", {}, [1.0, 2.0, 30.0], 180.0),                      # 10 x median 2 s is under the floor
    ("step", {}, [60.0, 40.0, 50.0, 1000.0], 550.0),            # 10 x the median; one slow step barely moves it
    ("data", {"step_timeout_s": 42}, [1.0] * 10, 42.0),         # a fixed value wins
    ("step", {"multiple": 3, "floor_s": 1}, [2.0] * 5, 6.0),
    ("checkpoint", {}, [], 2100.0),                             # upload deadline + margin
    ("checkpoint", {"checkpoint_timeout_s": 30}, [], 30.0),
    ("start", {"first_timeout_s": 99}, [], 99.0),
    ("idle", {}, [1.0] * 9, None),
])
def test_each_phase_gets_a_fixed_or_median_derived_timeout(phase, cfg, durations, expected):
    assert phase_timeout(phase, WatchdogConfig(**cfg), durations, checkpoint_s=2100.0) == expected


@pytest.mark.parametrize("phase,durations,expected", [
    ("step", [], 570.0),              # start-up allowance 1800 s, but peers' collectives give up at 600 s
    ("data", [200.0] * 5, 570.0),     # 10 x median capped too
    ("step", [2.0] * 5, 180.0),
    ("start", [], 570.0),
    ("checkpoint", [], 2100.0),       # the checkpoint group waits as long as the upload may take
])
def test_phases_whose_peers_wait_in_a_collective_stop_before_its_timeout(phase, durations, expected):
    from llm_runtime.watchdog import collective_cap

    cap = collective_cap(train_timeout_s=600.0, exchange_s=10.0)
    assert phase_timeout(phase, WatchdogConfig(), durations, checkpoint_s=2100.0, cap_s=cap) == expected


@pytest.mark.parametrize("err,expected", [
    (RuntimeError("[gloo/pair.cc:534] Timed out waiting 10000ms for recv operation to complete"), True),
    (RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)"), True),
    (RuntimeError("DataLoader timed out after 900 seconds"), True),
    (TimeoutError("upload did not finish within 4s"), True),
    (RuntimeError("Connection closed by peer [127.0.0.1]:5559"), False),
    (ValueError("timeout must be positive"), False),
])
def test_a_timed_out_collective_counts_as_a_stall_and_other_errors_do_not(err, expected):
    assert is_collective_timeout(err) is expected


@pytest.mark.parametrize("records,expected", [
    ([{"rank": 0, "in_collective": True}, {"rank": 1, "in_collective": False}], [1]),
    ([{"rank": 3, "in_collective": False}, {"rank": 1, "in_collective": False}], [1, 3]),
    ([{"rank": 0, "in_collective": True}, {"rank": 2, "in_collective": True}], [0, 2]),  # all wait: the network
])
def test_the_rank_stuck_outside_a_collective_is_the_suspect(records, expected):
    assert suspects(records) == expected


def test_when_every_reporter_waits_in_a_collective_the_silent_ranks_are_the_suspects():
    waiting = [{"rank": 0, "in_collective": True}, {"rank": 2, "in_collective": True}]
    assert suspects(waiting, world_size=4) == [1, 3]
    assert suspects(waiting + [{"rank": 1, "in_collective": True}, {"rank": 3, "in_collective": True}], 4) == [0, 1, 2, 3]


def test_a_failure_record_is_one_line_naming_host_rank_step_and_phase_without_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FAKE-SESSION-TOKEN-VALUE")
    line = FailureRecord("stalled", "algo-2", 3, 17, "data", "no progress FAKE-SESSION-TOKEN-VALUE", 61.2, 60.0,
                         "loader.py:12 next_batch", False, suspects=[3]).line()
    assert "\n" not in line and "FAKE-SESSION-TOKEN-VALUE" not in line
    for part in ("host=algo-2", "rank=3", "step=17", "phase=data", "stalled_s=61", "timeout_s=60",
                 "where=loader.py:12:next_batch", "suspect_ranks=3"):
        assert part in line


@pytest.mark.parametrize("failures,expected", [
    ([], exitcodes.OK),
    ([(2.0, 1), (1.0, -15)], exitcodes.FAILED),
    ([(2.0, 1), (1.0, exitcodes.STALLED)], exitcodes.STALLED),
    ([(1.0, 1), (2.0, exitcodes.BAD_NODE), (3.0, exitcodes.STALLED)], exitcodes.BAD_NODE),  # first documented
])
def test_the_launcher_exits_with_the_first_documented_worker_code(failures, expected):
    assert exitcodes.launcher_exit(failures) == expected


def test_a_stalled_phase_exits_with_the_documented_code_and_writes_its_record(tmp_path):
    """A real process: the watchdog thread sees the main thread sleep in phase data and ends it."""
    script = textwrap.dedent(f"""
        import time
        from llm_runtime.config import WatchdogConfig
        from llm_runtime.watchdog import Watchdog
        wd = Watchdog(WatchdogConfig(step_timeout_s=1.0, exchange_s=0.5), rank=0, world_size=1, host="algo-1",
                      output_dir={str(tmp_path)!r}, poll_s=0.1)
        wd.beat(7, "data")
        time.sleep(60)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == exitcodes.STALLED, proc.stderr[-2000:]
    failure = (tmp_path / "failure").read_text()
    assert "host=algo-1 rank=0 step=7 phase=data" in failure and "where=<string>:8:<module>" in failure
    record = json.loads((tmp_path / "failures" / "rank-00000.json").read_text())
    assert record["phase"] == "data" and record["suspects"] == [0]
    assert "time.sleep(60)" not in proc.stderr and "line 8 in <module>" in proc.stderr  # faulthandler's stacks
    assert "line 8 in <module>" in (tmp_path / "failures" / "rank-00000.stacks.txt").read_text()


def test_a_stall_still_exits_with_its_code_when_stderr_has_no_file_descriptor(tmp_path):
    """A notebook's stderr (no fileno): the stack dump falls back, the record and the exit code stay."""
    script = textwrap.dedent(f"""
        import io, sys, time
        from llm_runtime.config import WatchdogConfig
        from llm_runtime.watchdog import Watchdog
        sys.stderr = io.StringIO()
        wd = Watchdog(WatchdogConfig(step_timeout_s=0.5, exchange_s=0.2), rank=3, world_size=1, host="nb",
                      output_dir={str(tmp_path)!r}, poll_s=0.1)
        wd.beat(2, "step")
        time.sleep(60)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == exitcodes.STALLED, proc.stderr[-2000:]
    assert "rank=3 step=2 phase=step" in (tmp_path / "failure").read_text()


def test_a_new_run_sets_an_earlier_runs_failure_record_aside(tmp_path):
    from llm_runtime.failures import set_aside_failure

    assert set_aside_failure(str(tmp_path), "previous") == "" and set_aside_failure("", "previous") == ""
    (tmp_path / "failure").write_text("old\n")
    moved = set_aside_failure(str(tmp_path), "previous")
    assert "failures/previous-" in moved and not (tmp_path / "failure").exists()


@pytest.mark.parametrize("err,expected", [
    (RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:5559"), True),
    (RuntimeError("Connection reset by peer"), True),
    (RuntimeError("Timed out waiting 10000ms"), False),
    (ValueError("closed by peer"), False),
])
def test_an_error_from_a_vanished_peer_is_told_apart(err, expected):
    from llm_runtime.failures import lost_peer

    assert lost_peer(err) is expected
