"""trackers.py's rules: what a tracker is given, and that a failing one never reaches training."""
import logging
import threading

import pytest

from llm_runtime.config import MetricsConfig
from llm_runtime.trackers import Background, flat_params, numeric, tracker_problem


def test_params_are_the_flat_resolved_config_as_strings_with_secrets_masked():
    params = flat_params({"train": {"steps": 4, "lr": 0.001}, "data": {"uri": "s3://b/t?token=abcdef1234567890"}})
    assert params["train.steps"] == "4" and params["train.lr"] == "0.001"
    assert "abcdef1234567890" not in params["data.uri"] and params["data.uri"].startswith("s3://b/t?token=")


def test_metrics_are_the_records_finite_numbers_without_the_step():
    record = {"step": 4, "loss": 2.5, "mfu": float("nan"), "straggler": "algo-1:rank1", "slow_s": 0.2, "ok": True}
    assert numeric(record) == {"loss": 2.5, "slow_s": 0.2}


def test_calls_run_in_order_off_the_callers_thread():
    seen, threads = [], set()
    background = Background("test")
    for value in range(50):
        background.submit(lambda v=value: (seen.append(v), threads.add(threading.current_thread().name)))
    background.close(timeout_s=10)
    assert seen == list(range(50)) and threads == {"tracker-test"} and not background.failed


def test_a_tracker_that_keeps_failing_warns_once_and_its_later_records_are_dropped(caplog):
    calls = []

    def broken(value):
        calls.append(value)
        raise ConnectionError("server gone")

    background = Background("test", attempts=2)
    with caplog.at_level(logging.WARNING, logger="llm_runtime.trackers"):
        for value in range(5):
            background.submit(broken, value)
        background.close(timeout_s=30)
    assert calls == [0, 0]  # retried once, then nothing more is tried
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["metrics.test: the tracker failed (ConnectionError: server gone); its records are dropped "
                        "from now on and training goes on"]


def test_a_full_queue_drops_records_with_one_warning_and_never_blocks(caplog):
    gate = threading.Event()
    background = Background("test", queue_size=2)
    background.submit(gate.wait)  # the thread is busy with this one
    with caplog.at_level(logging.WARNING, logger="llm_runtime.trackers"):
        for _ in range(10):
            background.submit(lambda: None)  # returns at once even though nothing is taken
    gate.set()
    background.close(timeout_s=10)
    assert background.failed
    assert [r.getMessage() for r in caplog.records].count(
        "metrics.test: the tracker failed (its queue is full: it is slower than training); its records are dropped "
        "from now on and training goes on") == 1


@pytest.mark.parametrize("wandb, env, problem", [
    (False, {}, ""),
    (True, {"WANDB_MODE": "offline"}, ""),
    (True, {"WANDB_MODE": "online"}, ""),
    (True, {"WANDB_MODE": "disabled"}, ""),
    (True, {}, "metrics.wandb=true needs WANDB_MODE set explicitly"),
    (True, {"WANDB_MODE": ""}, "metrics.wandb=true needs WANDB_MODE set explicitly"),
    (True, {"WANDB_MODE": "offlin"}, "WANDB_MODE='offlin' (for metrics.wandb=true) is not one of"),
])
def test_wandb_refuses_to_start_unless_the_job_names_its_mode(wandb, env, problem):
    found = tracker_problem(MetricsConfig(wandb=wandb), env)
    assert found.startswith(problem) and bool(found) == bool(problem)
