"""Evaluation during training, end to end: the same held-out loss on every layout, and across a resume."""
import math
import re

import pytest

from tests.datasets import write_dataset
from tests.procs import BIN, metrics, run

pytestmark = pytest.mark.slow

TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8",
        "--train.steps=4", "--train.log_every=2", "--train.lr_schedule=constant", "--train.warmup_steps=0"]


def train(tmp_path, name, nproc, *args):
    path = tmp_path / f"{name}.jsonl"
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", str(nproc), *TINY, f"--metrics.jsonl={path}",
                f"--eval.data_uri={tmp_path / 'heldout'}", *args], timeout=300)
    rows = metrics(path) if path.exists() else []
    return {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}, proc


def test_eval_loss_before_and_after_training_is_the_same_on_one_rank_fsdp_tp_pp_and_both_deepspeed_engines(tmp_path):
    write_dataset(tmp_path / "heldout", [13, 11], seq_len=32)  # 24 samples: 3 eval batches of 8
    layouts = {"one rank": (1, ()), "fsdp x2": (2, ()), "fsdp x2 tp x2": (4, ("--parallel.tp=2",)),
               "pp x2": (2, ("--parallel.pp=2",))}
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        layouts["deepspeed zero-3 x2"] = (2, ("--parallel.backend=deepspeed", "--parallel.zero_stage=3"))
        layouts["deepspeed pipeline pp x2"] = (2, ("--parallel.backend=deepspeed", "--parallel.pp=2",
                                                   "--parallel.microbatches=2", "--parallel.zero_stage=1"))
    evals = {}
    for name, (nproc, args) in layouts.items():
        evals[name], proc = train(tmp_path, name.replace(" ", "-"), nproc, "--eval.at_start=true",
                                  "--eval.every_steps=2", *args)
        assert sorted(evals[name]) == [0, 2, 4], (name, proc.stdout[-3000:])
        assert "eval: " in proc.stderr + proc.stdout and "3 batches of 8 sequences (24 of its 24 samples)" in \
            proc.stdout + proc.stderr
    reference = evals["one rank"]
    for name, losses in evals.items():
        assert math.isclose(losses[0], reference[0], rel_tol=1e-5), (name, losses, reference)
        for step in (2, 4):
            assert math.isclose(losses[step], reference[step], rel_tol=1e-4), (name, step, losses, reference)
    assert reference[4] < reference[0]


def test_an_eval_after_a_resume_equals_the_uninterrupted_runs_and_a_finished_run_does_not_evaluate_again(tmp_path):
    write_dataset(tmp_path / "heldout", [16], seq_len=32)
    whole, _ = train(tmp_path, "whole", 2, "--eval.every_steps=2", f"--checkpoint.local_dir={tmp_path / 'a'}",
                     "--checkpoint.every_steps=2")
    ck = [f"--checkpoint.local_dir={tmp_path / 'b'}", "--checkpoint.every_steps=2"]
    first, _ = train(tmp_path, "first", 2, "--eval.every_steps=2", "--train.steps=2", *ck)
    resumed, proc = train(tmp_path, "resumed", 2, "--eval.every_steps=2", *ck)
    assert "resumed from checkpoint step 2" in proc.stdout + proc.stderr
    assert sorted(whole) == [2, 4] and list(first) == [2] and list(resumed) == [4]  # no eval of the resume point
    assert math.isclose(first[2], whole[2], rel_tol=1e-6) and math.isclose(resumed[4], whole[4], rel_tol=1e-6)
    again, proc = train(tmp_path, "again", 2, "--eval.every_steps=2", *ck)
    assert "nothing to train" in proc.stdout + proc.stderr and again == {}
    assert not re.search(r"eval: step=", proc.stdout + proc.stderr)
