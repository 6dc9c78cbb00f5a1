"""Tier-1 (node-local) checkpoints alone, end to end: real `llm-runtime train` jobs of 2 processes,
no checkpoint.uri, no S3. A job saves on local disk; the next job on the same disk resumes there.

``checkpoint.sagemaker_sync=true`` puts tier 1 under SageMaker's ``<base>/checkpoints`` (the folder
SageMaker itself syncs to S3); here the base is ``SAGEMAKER_BASE_DIR`` under tmp_path, and TMPDIR is
a folder of the test's too, so the default tier-1 place ($TMPDIR/llm_runtime/checkpoints) is watched.
"""
import pytest

from tests.procs import BIN, clean_env, metrics, run

pytestmark = pytest.mark.slow

TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8",
        "--train.log_every=1", "--train.warmup_steps=2", "--parallel.mixed_precision=fp32",
        "--watchdog.first_timeout_s=150", "--watchdog.step_timeout_s=90"]


def train(tmp_path, name, *args, steps):
    """One job of 2 processes; returns (its metrics, its whole output)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = clean_env(SAGEMAKER_BASE_DIR=str(tmp_path / "sm"), TMPDIR=str(tmp_path / "tmp"))
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", *TINY, f"--train.steps={steps}",
                f"--metrics.jsonl={tmp_path / name}.jsonl", *args], timeout=240, env=env)
    out = proc.stdout + proc.stderr
    (tmp_path / f"{name}.out").write_text(out)  # kept for a failure's diagnosis
    return metrics(tmp_path / f"{name}.jsonl"), out


def saved_steps(root):
    """Steps with a manifest (complete) under a tier-1 folder: <root>/<run>/node-N/step-S/manifest.json."""
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob("*/node-*/step-*/manifest.json"))


def test_sagemaker_sync_keeps_tier_one_in_sagemakers_checkpoint_folder_and_resumes_from_it_alone(tmp_path):
    """No checkpoint.uri: the resume reads tier 1 only (checkpoint.local_dir takes the same path,
    with another folder: tests/unit/test_paths.py)."""
    synced = tmp_path / "sm" / "checkpoints"
    ck = ["--checkpoint.sagemaker_sync=true", "--checkpoint.every_steps=2"]
    first, out = train(tmp_path, "first", *ck, steps=4)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    assert 4 in saved_steps(synced), sorted(str(p) for p in tmp_path.rglob("step-*"))
    assert not list((tmp_path / "tmp").rglob("step-*"))  # not in the default tier-1 place
    assert "resumed from checkpoint" not in out

    second, out = train(tmp_path, "second", *ck, steps=6)
    assert "resumed from checkpoint step 4" in out, out[-3000:]
    resumed_line = next(line for line in out.splitlines() if "resumed from checkpoint step 4" in line)
    assert str(synced) in resumed_line
    assert [m["step"] for m in second] == [5, 6]
    assert 6 in saved_steps(synced)
