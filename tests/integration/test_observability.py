"""One real training job's outputs, read the way users read them: SageMaker's regexes over the log,
the JSON lines file, TensorBoard's own reader, and the report image."""
import json
import math
import re

from llm_runtime.metrics import EVAL_FIELDS, FIELDS
from tests.datasets import write_dataset
from tests.procs import BIN, clean_env, metrics, run

SPECS = {name: spec for name, spec, *_ in FIELDS}  # the line prints each value with its format
EVAL_SPECS = {name: (field, spec) for _, field, spec, name, _ in EVAL_FIELDS}

TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8",
        "--train.warmup_steps=2", "--train.steps=6", "--train.log_every=2"]


def test_a_jobs_metrics_reach_the_log_the_jsonl_tensorboard_and_the_report_with_the_same_values(tmp_path):
    out = tmp_path / "out"
    write_dataset(tmp_path / "heldout", [9, 11], seq_len=32)  # 20 samples: 2 eval batches of 8
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", *TINY, f"--train.output_dir={out}",
                f"--checkpoint.uri={tmp_path / 'ck'}", "--checkpoint.every_steps=2", "--metrics.tensorboard=true",
                "--metrics.peak_tflops=0.5", f"--eval.data_uri={tmp_path / 'heldout'}", "--eval.every_steps=4"],
               timeout=240, env=clean_env())
    rows = metrics(out / "metrics.jsonl")  # the default place: the output dir
    records, evals = [r for r in rows if "eval_loss" not in r], [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 6]  # every 4 steps, and at the end
    assert all(math.isclose(r["eval_ppl"], math.exp(r["eval_loss"]), rel_tol=1e-9) for r in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] < 5.6  # it learns the held-out rows' repeated token
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(0 < r["mfu"] < 1 and r["memory_gb"] > 0 and r["step_time_s"] > 0 for r in records)
    assert records[1]["checkpoint_blocked_s"] > 0  # the step-2 save fell in the second interval
    assert all(r["checkpoint_slowdown_s"] >= 0 and r["overhead_s"] >= 0 for r in records)
    saves = re.findall(r"checkpoint step=(\d+) blocked_s=([0-9.]+) slowdown_s=([0-9.]+) upload_s=[0-9.]+ bytes=\d+ "
                       r"objects=\d+", proc.stdout + proc.stderr)
    assert [int(step) for step, *_ in saves] == [2, 4, 6], proc.stdout + proc.stderr  # each save's line, once

    # SageMaker's metric definitions, as the CLI prints them, read every value back from the real log.
    definitions = json.loads(run([str(BIN / "llm-runtime"), "metric-definitions", "--json"], timeout=60).stdout)
    lines = [line for line in proc.stdout.splitlines() if "metrics: step=" in line]
    assert len(lines) == 3
    for line, record in zip(lines, records):
        for item in definitions:
            key = item["Name"].split(":", 1)[1]
            if key == "straggler_slow_s":  # on the line only while a straggler is named (none here)
                assert "slow_s" not in record and re.search(item["Regex"], line) is None, line
                continue
            if item["Name"].startswith("eval:"):  # the eval line's, below
                assert re.search(item["Regex"], line) is None, (item, line)
                continue
            match = re.search(item["Regex"], line)
            assert match, (item, line)
            assert float(match.group(1)) == float(format(record[key], SPECS[key])), (key, line, record)
    eval_lines = [line for line in proc.stdout.splitlines() if "eval: step=" in line]
    assert [int(re.search(r"step=(\d+)", line).group(1)) for line in eval_lines] == [4, 6]
    for line, record in zip(eval_lines, evals):
        for item in definitions:
            if item["Name"] in EVAL_SPECS:
                field, spec = EVAL_SPECS[item["Name"]]
                assert float(re.search(item["Regex"], line).group(1)) == float(format(record[field], spec)), line
            else:
                assert re.search(item["Regex"], line) is None, (item, line)  # no train metric reads the eval line

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [2, 4, 6]
    assert [round(e.value, 4) for e in losses] == [round(r["loss"], 4) for r in records]
    assert "train/mfu" in events.Tags()["scalars"]
    held_out = events.Scalars("eval/loss")
    assert [(e.step, round(e.value, 4)) for e in held_out] == [(r["step"], round(r["eval_loss"], 4)) for r in evals]

    report = run([str(BIN / "llm-runtime"), "report", str(out / "metrics.jsonl"), "--out", str(tmp_path / "r.png")],
                 timeout=120)
    assert "report: " in report.stdout and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
