"""Bad batches rolled back and skipped: real 2-rank jobs (gloo), the loss poisoned by the nan and
spike drills (LLM_RUNTIME_FAULT), checkpoints on node-local disk, the final weights compared bit
for bit with a clean run told to skip the same batch."""
import json
import math
import shutil

import pytest
from safetensors.torch import load_file

from llm_runtime import exitcodes
from tests.procs import BIN, clean_env, metrics, run

pytestmark = pytest.mark.slow

TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8",
        "--train.warmup_steps=2", "--parallel.mixed_precision=fp32", "--checkpoint.every_steps=3",
        "--checkpoint.keep=10", "--checkpoint.run_id=drill", "--train.spike_window=3"]


def train(tmp_path, name, *args, nproc=2, steps=10, fault="", check=True):
    out = tmp_path / name
    argv = [str(BIN / "llm-runtime"), "train", "--nproc-per-node", str(nproc), *TINY, f"--train.steps={steps}",
            f"--metrics.jsonl={out}/metrics.jsonl", f"--checkpoint.local_dir={out}/ck", f"--train.model_dir={out}/model",
            f"--train.output_dir={out}/output", *args]
    env = clean_env(**({"LLM_RUNTIME_FAULT": fault} if fault else {}))
    proc = run(argv, timeout=240, env=env, check=check)
    log = proc.stdout + proc.stderr
    (tmp_path / f"{name}.log").write_text(log)
    rows = metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    return rows, log, proc.returncode


def weights(tmp_path, name):
    tensors = {}
    for path in sorted((tmp_path / name / "model").glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no final model in {tmp_path / name / 'model'}"
    return tensors


def skips(tmp_path, name):
    return json.loads((tmp_path / name / "ck" / "drill" / "node-00000" / "skipped_batches.json").read_text())


def test_a_nan_at_a_save_step_rolls_back_skips_the_batch_and_ends_with_the_weights_of_a_clean_run_told_to_skip_it(
        tmp_path):
    # Step 6 is a save step and no log step: its check runs before the save, so nothing poisoned is
    # committed and the rollback goes to step 3.
    drilled, log, _ = train(tmp_path, "drilled", "--train.log_every=5", fault="nan:step=6")
    assert "step 6: the loss is nan: rolling back to checkpoint step 3" in log, log
    assert "step 6: its batch is skipped" in log
    record = skips(tmp_path, "drilled")
    assert (record["skipped"], record["poisoned"], record["rollbacks"]) == ([6], [], 1)
    assert record["events"][0]["rolled_back_to"] == 3
    clean, clean_log, _ = train(tmp_path, "clean", "--train.log_every=5", "--data.skip_steps=6")
    assert "rolling back" not in clean_log
    assert [r["step"] for r in drilled] == [5, 5, 10] and [r["step"] for r in clean] == [5, 10]  # 5 ran twice
    assert drilled[-1]["loss"] == clean[-1]["loss"] and drilled[-1]["lr"] == clean[-1]["lr"]
    mine, theirs = weights(tmp_path, "drilled"), weights(tmp_path, "clean")
    assert mine.keys() == theirs.keys()
    assert all(mine[k].isfinite().all() and mine[k].equal(theirs[k]) for k in mine)

    # Resumed on another data-parallel size (1 rank) from the checkpoint before the bad step: it
    # skips step 6 again, from skipped_batches.json, and reaches the drilled run's loss.
    shutil.copytree(tmp_path / "drilled" / "ck", tmp_path / "one" / "ck")
    node = tmp_path / "one" / "ck" / "drill" / "node-00000"
    for step in (6, 9, 10):
        shutil.rmtree(node / f"step-{step:09d}")
    resumed, resumed_log, _ = train(tmp_path, "one", "--train.log_every=1", nproc=1)
    assert "resumed from checkpoint step 3" in resumed_log, resumed_log
    assert "step 6: its batch is skipped" in resumed_log
    assert [r["step"] for r in resumed] == [4, 5, 7, 8, 9, 10]
    assert math.isclose(resumed[-1]["loss"], drilled[-1]["loss"], rel_tol=1e-4)


def test_a_spike_below_the_threshold_trains_on_and_one_above_it_rolls_back(tmp_path):
    rows, log, _ = train(tmp_path, "spiky", "--train.log_every=1",
                         fault="spike:step=4,factor=1.01;spike:step=8,factor=3")
    assert log.count("rolling back") == 1  # the 1% rise at step 4 is within the recent losses' spread
    assert "step 8: the loss " in log and "train.spike_sigma" in log and "rolling back to checkpoint step 6" in log
    record = skips(tmp_path, "spiky")
    assert (record["skipped"], record["rollbacks"]) == ([8], 1)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 7, 9, 10]  # 7 ran again after the rollback to 6
    assert rows[6]["loss"] == rows[7]["loss"]  # the replay is exact


def test_past_max_rollbacks_the_job_fails_with_a_record_saying_why(tmp_path):
    rows, log, code = train(tmp_path, "twice", "--train.log_every=1", "--train.max_rollbacks=1",
                            fault="nan:step=5;nan:step=8", check=False)
    assert code == exitcodes.FAILED, log
    assert "rolling back to checkpoint step 3" in log
    failure = (tmp_path / "twice" / "output" / "failure").read_text()
    assert "step 8: the loss is nan" in failure and "train.max_rollbacks=1" in failure, failure
    assert skips(tmp_path, "twice")["skipped"] == [5]


def test_a_nan_without_checkpoints_fails_at_once_naming_the_step(tmp_path):
    out = tmp_path / "bare"
    argv = [str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", "--model.dim=64", "--model.layers=2",
            "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8", "--train.steps=8",
            "--train.log_every=4", f"--train.output_dir={out}"]
    proc = run(argv, timeout=240, env=clean_env(LLM_RUNTIME_FAULT="nan:step=2"), check=False)
    assert proc.returncode == exitcodes.FAILED, proc.stdout + proc.stderr
    failure = (out / "failure").read_text()
    assert "step 2: the loss is nan" in failure and "no checkpoints to roll back to" in failure, failure


def test_a_spike_before_the_first_save_trains_on_and_a_later_nan_rolls_back_whatever_resume_says(tmp_path):
    rows, log, _ = train(tmp_path, "early", "--train.log_every=1", "--checkpoint.every_steps=5",
                         "--checkpoint.resume=never", fault="spike:step=4,factor=3;nan:step=7")
    assert "step 4: the loss " in log and "no clean checkpoint before it to roll back to" in log
    assert "training on" in log
    assert "step 7: the loss is nan: rolling back to checkpoint step 5" in log  # resume=never is for starting
    assert [r["step"] for r in rows] == [1, 2, 3, 5, 6, 6, 8, 9, 10]  # 4's line is not written; 6 ran again
    assert skips(tmp_path, "early")["skipped"] == [7]
