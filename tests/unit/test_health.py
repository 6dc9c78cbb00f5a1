"""The health check's verdicts: wrong results, stragglers, bandwidth (the CUDA branches need a GPU)."""
import pytest
import torch

from llm_runtime.config import HealthConfig
from llm_runtime.health import RankHealth, _check_matmul, bus_bandwidth, judge, matmul_error, tolerance


def _rank(rank, seconds, host="algo-1", errors=()):
    return RankHealth(rank=rank, host=host, errors=list(errors), matmul_s=seconds)


@pytest.mark.parametrize("times,factor,stragglers", [
    ([1.0, 1.0, 1.0, 1.0], 1.5, []),
    ([1.0, 10.0], 1.5, [1]),                 # the lower median: one slow rank of two still stands out
    ([1.0, 1.1, 0.9, 1.6], 1.5, [3]),
    ([1.0, 1.1, 0.9, 1.4], 1.5, []),
    ([2.0, 2.0, 2.0, 2.0, 9.0, 9.5], 1.5, [4, 5]),
])
def test_ranks_far_slower_than_the_median_are_named_stragglers(times, factor, stragglers):
    verdict = judge([_rank(i, t) for i, t in enumerate(times)], factor)
    assert [r.rank for r, _ in verdict.stragglers] == stragglers and not verdict.bad
    assert not verdict.failed(stragglers_fail=False) and verdict.failed(stragglers_fail=True) == bool(stragglers)


def test_a_rank_with_a_wrong_result_fails_the_check_and_its_host_is_named():
    verdict = judge([_rank(0, 1.0), _rank(1, 1.0, "algo-2", ["matmul off by 37"]), _rank(2, 1.0)], 1.5)
    assert [r.rank for r in verdict.bad] == [1] and verdict.failed(stragglers_fail=False)
    assert verdict.blamed(False) == "bad hosts algo-2; rank 1 (algo-2): matmul off by 37"


def test_matmul_error_is_relative_to_the_reference_and_nan_is_infinitely_wrong():
    reference = torch.tensor([[2.0, -4.0]], dtype=torch.float64)
    assert matmul_error(torch.tensor([[2.0, -4.0]]), reference) == 0.0
    assert matmul_error(torch.tensor([[2.0, -3.0]]), reference) == pytest.approx(0.25)
    assert matmul_error(torch.tensor([[float("nan"), -4.0]]), reference) == float("inf")
    assert tolerance(torch.bfloat16) > tolerance(torch.float32)


def test_bus_bandwidth_follows_the_nccl_tests_convention():
    assert bus_bandwidth(1000, 1.0, 2) == 1000.0
    assert bus_bandwidth(1000, 1.0, 8) == pytest.approx(1750.0)
    assert bus_bandwidth(1000, 1.0, 1) == 0.0


def test_a_cpu_matmul_passes_and_an_injected_corruption_is_caught(monkeypatch):
    cfg = HealthConfig(matmul_size=64, iters=2)
    errors, seconds, tflops = _check_matmul(cfg, torch.device("cpu"), rank=0)
    assert errors == [] and seconds > 0 and tflops > 0
    monkeypatch.setenv("LLM_RUNTIME_FAULT", "corrupt:rank=0,phase=health")
    errors, _, _ = _check_matmul(cfg, torch.device("cpu"), rank=0)
    assert len(errors) == 1 and "matmul 64x64 float32 off by" in errors[0]
    assert _check_matmul(cfg, torch.device("cpu"), rank=1)[0] == []  # the fault names rank 0 only
