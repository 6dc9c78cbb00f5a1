"""The metrics line, SageMaker's regexes over it, MFU and where the files go."""
import math
import re

import pytest

from llm_runtime.metrics import (EVAL_FIELDS, FIELDS, OPTIONAL, MetricsWindow, format_eval_line, format_line,
                                 metric_definitions, mfu, peak_tflops)
from llm_runtime.progress import bar

RECORD = {"step": 120, "loss": 3.14159, "lr": 2.5e-4, "tokens_per_s": 51234.4, "tokens_per_s_per_device": 6404.3,
          "step_time_s": 0.6401, "mfu": 0.41234, "grad_norm": 0.81234, "memory_gb": 61.2, "data_wait_s": 0.00123,
          "checkpoint_blocked_s": 0.0, "checkpoint_slowdown_s": 0.0123, "overhead_s": 0.00041}


def test_the_metrics_line_has_every_field_in_its_fixed_order():
    assert format_line(RECORD) == (
        "metrics: step=120 loss=3.1416 lr=2.500e-04 tokens_per_s=51234 tokens_per_s_per_device=6404 "
        "step_time_s=0.640 mfu=0.412 grad_norm=0.8123 memory_gb=61.20 data_wait_s=0.0012 checkpoint_blocked_s=0.000 "
        "checkpoint_slowdown_s=0.012 overhead_s=0.0004")
    assert "mfu=nan" in format_line({**RECORD, "mfu": float("nan")})


def test_a_named_straggler_ends_the_line_and_only_then():
    named = {**RECORD, "straggler": "algo-2:rank3", "slow_s": 0.21049}
    assert format_line(named) == format_line(RECORD) + " straggler=algo-2:rank3 slow_s=0.2105"
    assert "straggler" not in format_line({**RECORD, "straggler": None, "slow_s": None})


def test_each_sagemaker_regex_reads_its_value_back_from_the_line():
    record = {**RECORD, "straggler": "algo-2:rank3", "slow_s": 0.21049}
    line = "[rank 0] INFO llm_runtime.metrics: " + format_line(record)
    got = {}
    for item in metric_definitions():
        if item["Name"].startswith("eval:"):  # the eval line's (below)
            assert re.search(item["Regex"], line) is None, item
            continue
        match = re.search(item["Regex"], line)
        got[item["Name"]] = float(match.group(1))
    expected = {name: float(format(record[key], spec)) for key, spec, name, _ in FIELDS + OPTIONAL if key != "step"}
    assert got == expected
    assert re.search(next(d["Regex"] for d in metric_definitions() if d["Name"] == "train:straggler_slow_s"),
                     format_line(RECORD)) is None
    unknown = format_line({**RECORD, "mfu": float("nan")})
    assert re.search(next(d["Regex"] for d in metric_definitions() if d["Name"] == "train:mfu"), unknown) is None
    assert all(re.search(d["Regex"], "step=5 loss=1.0 tokens_per_s=9") is None for d in metric_definitions())


def test_the_eval_line_is_its_own_and_sagemaker_reads_loss_and_perplexity_from_it_only():
    record = {"step": 40, "eval_loss": 3.20114, "eval_ppl": 24.5604}
    line = "[rank 0] INFO llm_runtime.metrics: " + format_eval_line(record)
    assert line.endswith("eval: step=40 loss=3.2011 ppl=24.560")
    got = {d["Name"]: float(m.group(1)) for d in metric_definitions() if (m := re.search(d["Regex"], line))}
    assert got == {"eval:loss": 3.2011, "eval:ppl": 24.56}
    assert {name for _, _, _, name, _ in EVAL_FIELDS} == {"eval:loss", "eval:ppl"}
    assert "ppl=nan" in format_eval_line({**record, "eval_ppl": float("inf")})


def test_time_spent_evaluating_is_not_in_the_windows_step_time_or_throughput():
    window = MetricsWindow(tokens_per_step=100, world_size=1, flops_per_token=1.0, peak=0.0, started=0.0)
    window.steps, window.compute_s, window.eval_s = 2, 1.0, 8.0
    import time as clock

    now = clock.perf_counter()
    record = window.close(step=2, loss=1.0, lr=1.0, grad_norm=0.0, memory=0.0)
    assert record["step_time_s"] == pytest.approx((now - 8.0) / 2, rel=1e-3)
    assert window.eval_s == 0.0


# Device names as torch.cuda.get_device_name() reports them, and the dense BF16 Tensor Core
# TFLOP/s of NVIDIA's datasheets (half the "with sparsity" figure where only that one is quoted).
# Several names contain another device's name: GH200 / H200, H100 PCIe / H100, L40S / L40 / L4,
# A100 / A10.
DATASHEET_DENSE_BF16_TFLOPS = [
    ("NVIDIA H100 80GB HBM3", 989.5),  # H100 SXM: 1,979 with sparsity
    ("NVIDIA H100 PCIe", 756.5),  # 1,513 with sparsity
    ("NVIDIA H100 NVL", 835.5),  # 1,671 with sparsity
    ("NVIDIA H200", 989.5),  # 1,979 with sparsity
    ("NVIDIA GH200 480GB", 989.5),  # 1,979 with sparsity
    ("NVIDIA B200", 2250.0),  # 4.5 PFLOP/s with sparsity
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05),
    ("NVIDIA L4", 121.0),
]


@pytest.mark.parametrize("device,dense_tflops", DATASHEET_DENSE_BF16_TFLOPS,
                         ids=[d for d, _ in DATASHEET_DENSE_BF16_TFLOPS])
def test_mfu_is_measured_against_each_gpus_datasheet_dense_bf16_peak(device, dense_tflops):
    assert peak_tflops(device) == pytest.approx(dense_tflops, rel=0.005)


@pytest.mark.parametrize("device,override,expected", [
    ("cpu", 0, 0.0), ("NVIDIA Tesla X1000", 0, 0.0), ("NVIDIA H100 80GB HBM3", 700, 700.0), ("cpu", 2.5, 2.5),
])
def test_an_unknown_device_has_no_peak_and_metrics_peak_tflops_always_wins(device, override, expected):
    assert peak_tflops(device, override) == expected


def test_mfu_is_achieved_model_flops_over_the_peak_and_nan_without_one():
    assert mfu(1000.0, 6e9, 989.0) == pytest.approx(6e12 / 989e12)
    assert math.isnan(mfu(1000.0, 6e9, 0.0))


def test_a_window_turns_counts_into_per_step_means_and_job_rates():
    window = MetricsWindow(tokens_per_step=1000, world_size=4, flops_per_token=6e6, peak=1.0)
    window.started -= 2.0  # two seconds ago
    window.steps, window.data_wait_s, window.checkpoint_blocked_s, window.compute_s = 4, 0.4, 1.0, 0.6
    record = window.close(step=4, loss=2.0, lr=1e-3, grad_norm=0.5, memory=1.5)
    assert record["tokens_per_s"] == pytest.approx(2000, rel=0.01)
    assert record["tokens_per_s_per_device"] == pytest.approx(record["tokens_per_s"] / 4)
    assert record["step_time_s"] == pytest.approx(0.5, rel=0.01)
    assert (record["data_wait_s"], record["checkpoint_blocked_s"]) == (0.1, 0.25)
    assert record["overhead_s"] == pytest.approx((2.0 - 0.6 - 1.0) / 4, rel=0.01)  # neither model nor saves
    assert record["mfu"] == pytest.approx(500 * 6e6 / 1e12, rel=0.01)
    assert window.steps == 0 and window.data_wait_s == 0.0 and window.compute_s == 0.0  # the next starts empty


def test_progress_bars_show_on_request_and_stay_silent_otherwise(capsys):
    with bar(1000, "upload") as shown:
        shown.update(1000)  # stderr is not a terminal under pytest: silent
    assert capsys.readouterr().err == ""
    with bar(2048, "checkpoint step 3: upload", enabled=True) as shown:
        shown.update(2048)
    err = capsys.readouterr().err
    assert "checkpoint step 3: upload" in err and "100%" in err and "2.00k" in err


def test_a_user_models_flops_per_token_is_the_override_or_6n():
    import torch

    from llm_runtime.metrics import flops_per_token

    model = torch.nn.Linear(10, 5)  # 55 parameters
    assert flops_per_token(model) == 330.0 and flops_per_token(model, override=1e9) == 1e9
    with pytest.raises(ValueError):
        flops_per_token()
