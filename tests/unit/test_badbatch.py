"""Bad batches: which loss is bad (a table), the steps a user skips, and skipped_batches.json."""
import math

import pytest

from llm_runtime.badbatch import LossGuard, parse_steps
from llm_runtime.checkpoint.skips import Skips, read_skips, rollback_target, with_rollback, write_skips
from llm_runtime.faults import Fault, FaultError, drilled_loss, loss_drill, loss_factor, parse_faults
from llm_runtime.storage import open_store

STEADY = [2.0, 2.1, 1.9, 2.0, 2.1, 1.9]  # mean 2.0, standard deviation ~0.082


@pytest.mark.parametrize("history,losses,sigma,bad", [
    (STEADY, [2.05, 2.1], 6.0, None),  # within the noise
    (STEADY, [2.05, 2.6], 6.0, 2),  # 7 sigma up: the second step is bad
    (STEADY, [2.6], 8.0, None),  # the same rise under a wider threshold
    (STEADY, [2.6], 0.0, None),  # spikes off: only non-finite losses count
    (STEADY, [float("nan")], 0.0, 1),
    (STEADY, [2.0, float("inf"), float("nan")], 6.0, 2),  # the first bad step is the one reported
    (STEADY[:3], [9.0], 6.0, None),  # the window is not full yet: no spike is judged
    ([], [float("nan")], 6.0, 1),  # non-finite needs no history
    (STEADY, [1.0], 6.0, None),  # a drop is never a spike
])
def test_a_loss_is_bad_when_not_finite_or_above_mean_plus_k_sigma_of_a_full_window(history, losses, sigma, bad):
    guard = LossGuard(sigma, window=len(STEADY))
    assert guard.check(range(-len(history), 0), history) is None
    found = guard.check(range(1, len(losses) + 1), losses)
    assert (found.step if found else None) == bad
    if found is not None:
        assert found.reason.startswith("the loss ") and found.loss == losses[bad - 1] or math.isnan(found.loss)


def test_the_spike_reason_names_the_threshold_and_its_key():
    guard = LossGuard(6.0, window=len(STEADY))
    guard.check(range(len(STEADY)), STEADY)
    found = guard.check([10], [3.0])
    assert "3.0000 is above" in found.reason and "train.spike_sigma" in found.reason and "last 6 steps" in found.reason


def test_a_rollback_forgets_the_history_it_will_replay():
    guard = LossGuard(6.0, window=4)
    assert guard.check([1, 2, 3, 4, 5], [2.0, 2.1, 1.9, 2.0, 9.0]).step == 5  # 1-4 kept
    guard.forget_after(2)
    assert [s for s, _ in guard._history] == [1, 2]
    assert guard.check([3], [9.0]) is None  # two steps of history: no spike is judged yet


@pytest.mark.parametrize("text,steps", [("", set()), ("7", {7}), ("7, 12,30-32", {7, 12, 30, 31, 32}),
                                        ("5-5", {5})])
def test_skip_steps_take_steps_and_ranges(text, steps):
    assert parse_steps(text) == steps


@pytest.mark.parametrize("text,needle", [("x", "'x' is not a step"), ("0", "'0' is not a step >= 1"),
                                         ("9-3", "'9-3' is not a step >= 1 or a range"), ("1-b", "'1-b'")])
def test_a_bad_skip_step_is_quoted_with_its_key(text, needle):
    with pytest.raises(ValueError, match=needle) as err:
        parse_steps(text)
    assert "data.skip_steps=" in str(err.value)


def test_a_rollback_skips_the_step_and_poisons_every_checkpoint_at_or_after_it():
    skips = with_rollback(Skips(), 7, "the loss is nan", committed=[3, 6, 9])
    assert (skips.skipped, skips.poisoned, skips.rollbacks) == ((7,), (9,), 1)
    assert skips.events[0]["rolled_back_to"] == 6 and skips.events[0]["reason"] == "the loss is nan"
    again = with_rollback(skips, 5, "spike", committed=[3, 6, 9])
    assert (again.skipped, again.poisoned, again.rollbacks) == ((5, 7), (6, 9), 2)
    assert rollback_target(again, 8, [3, 6, 9]) == 3  # 6 and 9 are poisoned
    assert rollback_target(Skips(), 3, [3, 6]) == 0  # nothing before the bad step


def test_skipped_batches_json_round_trips_through_a_store_and_a_bad_one_is_named(tmp_path):
    store = open_store(str(tmp_path))
    assert read_skips(store) == Skips()
    skips = with_rollback(Skips(), 7, "the loss is nan", committed=[6])
    write_skips(store, skips)
    assert read_skips(store) == skips
    (tmp_path / "skipped_batches.json").write_text('{"skipped": [1]}')
    with pytest.raises(ValueError, match="skipped_batches.json is not a skipped-batches record"):
        read_skips(store)


def test_the_nan_and_spike_drills_parse_strictly():
    assert parse_faults("nan:step=7") == [Fault("nan", None, 7)]
    assert parse_faults("spike:step=9,factor=4") == [Fault("spike", None, 9, factor=4.0)]
    for text, needle in (("spike:step=9", "spike needs factor=F"), ("nan:step=3,factor=2", "nan takes none"),
                         ("nan:step=3,phase=data", "nan applies to phase=step only"),
                         ("hang:factor=2", "factor=F applies to slow at phase=step and to spike only")):
        with pytest.raises(FaultError, match=needle):
            parse_faults(text)


def test_the_loss_drill_scales_the_loss_of_its_step_only():
    env = {"LLM_RUNTIME_FAULT": "nan:step=7;spike:step=9,factor=4,rank=1"}
    assert math.isnan(loss_factor(0, 7, env)) and loss_factor(0, 8, env) == 1.0
    assert loss_factor(1, 9, env) == 4.0 and loss_factor(0, 9, env) == 1.0
    with loss_drill(4.0):
        assert drilled_loss(2.5) == 10.0
    assert drilled_loss(2.5) == 2.5
