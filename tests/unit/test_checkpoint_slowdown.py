"""A save's hidden cost: the steps that ran during its background work, above the clean steps' median."""
import pytest

from llm_runtime.checkpoint.slowdown import SlowdownMeter


def _run(steps):
    """steps: (duration, blocked_s, save in flight after this boundary) -> the loss reported per step."""
    meter, now, lost = SlowdownMeter(), 0.0, []
    meter.boundary(now, False)
    for took, blocked, in_flight in steps:
        now += took
        lost.append(meter.boundary(now, in_flight, blocked))
    return lost


def test_steps_slowed_by_a_save_in_flight_count_their_excess_over_the_clean_median():
    lost = _run([(1.0, 0, False), (1.0, 0, False), (1.2, 0, False), (1.5, 0.5, True),  # saved here: 0.5 blocked
                 (1.6, 0, True), (1.3, 0, False), (1.0, 0, False)])
    assert lost[:4] == [0.0] * 4  # clean steps; the save step's own time is blocked + clean
    assert lost[4] == pytest.approx(0.6) and lost[5] == pytest.approx(0.3)  # ran with the save in flight
    assert lost[6] == 0.0


def test_a_step_faster_than_usual_never_counts_as_negative_loss():
    assert _run([(1.0, 0, False)] * 3 + [(1.0, 0, True), (0.5, 0, False)])[-1] == 0.0


def test_nothing_is_charged_before_enough_clean_steps_are_known():
    assert _run([(1.0, 0, True), (5.0, 0, True), (5.0, 0, False)]) == [0.0, 0.0, 0.0]
