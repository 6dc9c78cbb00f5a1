"""benchmarks/s3_scale.py: the paper model of S3 request rates per prefix holds the defaults to its target."""
import numpy as np
import pytest

from benchmarks.s3_scale import INSTANCES, checkpoint_peaks, compare, peak_per_second, worst_at


@pytest.mark.parametrize("times,expected", [
    (np.linspace(0, 0.5, 10), 10),         # a burst inside one second
    (np.linspace(0, 9.99, 100), 10),       # 10 per second, evenly
    (np.array([]), 0),
])
def test_the_peak_is_the_most_requests_in_any_one_second_window(times, expected):
    assert peak_per_second([(times, np.ones(len(times)))]) == pytest.approx(expected, abs=1)


def test_the_default_settings_keep_every_prefix_under_half_its_rate_at_1024_nodes():
    before, now = compare()
    assert worst_at(now, 1024) <= 0.5, [row for row in now if row[2] == 1024]
    assert worst_at(before, 1024) > 1.0  # step-first keys, an index read per rank: over the limit


def test_step_first_keys_put_a_whole_checkpoint_on_one_unsplit_prefix():
    p5 = INSTANCES[1]
    kwargs = dict(part_mb=64, concurrency=8, spread=16)
    step_first = checkpoint_peaks(1024, 70e9, p5, spread_first=False, **kwargs)
    spread_first = checkpoint_peaks(1024, 70e9, p5, spread_first=True, **kwargs)
    assert step_first / spread_first == pytest.approx(16, rel=0.2)


def test_the_results_table_keeps_the_newest_value_of_each_claim_and_says_if_it_meets_its_target(tmp_path):
    from benchmarks.common import met, refresh_current

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nintro\n\n## a (1)\n\n```\nRESULT x value=1 baseline=2 ratio=0.5 "
                       "target=>=0.98\n```\n\n## b (2)\n\n```\nRESULT x value=2 baseline=2 ratio=1 target=>=0.98\n"
                       "RESULT y value=3 baseline=1 ratio=3 target=report\n```\n")
    refresh_current(results)
    refresh_current(results)  # idempotent: one table, the history untouched
    text = results.read_text()
    assert text.count("## Current") == 1 and text.count("RESULT x") == 2
    assert "| x | 2 | 2 | 1 | >=0.98 | yes | b (2) |" in text and "| y | 3 | 1 | 3 | report | - | b (2) |" in text
    assert text.index("## Current") < text.index("## a (1)")
    assert [met("0.5", ">=0.98"), met("0.005", "<=0.01"), met("2", "<1"), met("1", "value<100")] == \
        ["no", "yes", "no", "-"]


def test_a_saves_hidden_cost_is_the_in_flight_steps_time_above_the_clean_median():
    from benchmarks.checkpoint_peers import costs

    times = [5.0, 5.0, 5.0] + [1.0] * 11 + [1.0, 1.5, 2.0, 1.0]  # warm-up, clean, the save, two slowed steps
    flight = [False] * 15 + [True, True, False]
    got = costs(times, flight, at=15, since=4)
    assert got["clean_step_s"] == 1.0 and got["steps_in_flight"] == 2
    assert got["slowdown_s"] == pytest.approx(0.5 + 1.0) and got["speed_in_flight"] == pytest.approx(1 / 1.75)


def test_the_second_save_is_measured_against_the_clean_steps_after_the_first():
    from benchmarks.checkpoint_peers import save_costs

    # warm-up 3, clean 1.0 s x 12 (steps 4-15), save 1 after step 15: 2 steps in flight at 3 s,
    # clean 2.0 s x 5 (steps 18-22: another rate, as after a warm-up), save 2 after step 22: 1 step at 2.5 s
    times = [5.0] * 3 + [1.0] * 12 + [3.0, 3.0] + [2.0] * 5 + [2.5, 2.0]
    flight = [False] * 15 + [True, True] + [False] * 5 + [True, False]
    first, second = save_costs({"times": times, "in_flight": flight, "saves": [{"at": 15}, {"at": 22}]})
    assert (first["clean_step_s"], first["steps_in_flight"], first["slowdown_s"]) == (1.0, 2, pytest.approx(4.0))
    assert (second["clean_step_s"], second["steps_in_flight"], second["slowdown_s"]) == (2.0, 1, pytest.approx(0.5))


def test_the_reported_checkpoint_cost_is_the_mean_of_the_saves_after_the_first():
    from benchmarks.checkpoint_peers import steady_mean

    saves = [{"blocked_s": 9.0, "slowdown_s": 9.0}, {"blocked_s": 0.02, "slowdown_s": 0.3},
             {"blocked_s": 0.04, "slowdown_s": 0.5}]
    got = steady_mean(saves)
    assert got == {"blocked_s": pytest.approx(0.03), "slowdown_s": pytest.approx(0.4), "saves": 2}
    assert steady_mean(saves[:1])["blocked_s"] == 9.0  # a single save is all there is
