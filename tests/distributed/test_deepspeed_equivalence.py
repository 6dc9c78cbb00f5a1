"""The DeepSpeed backend trains the bundled model exactly like one process (gloo, fp32, CPU).

Real DeepSpeed engines started by `llm-runtime train` (no deepspeed launcher); compiled ops are
cached in TORCH_EXTENSIONS_DIR (tests/conftest.py) and the optimizer is torch's AdamW.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest

from tests.distributed.test_parallel_equivalence import COMMON, LR, STEPS, train
from tests.procs import BIN, clean_env, free_port, metrics, run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="DeepSpeed is not installed (pip install 'llm-runtime[deepspeed]')")]

DS = ["--parallel.backend=deepspeed"]
LAYOUTS = [
    ("zero3-2ranks-activation-checkpointing", 2, ["--parallel.zero_stage=3", "--parallel.activation_checkpoint=full"],
     "ZeRO stage 3, 2 data-parallel x 1 pipeline"),
    ("zero1-4ranks-accumulation", 4, ["--parallel.zero_stage=1", "--train.micro_batch_size=1"],
     "ZeRO stage 1, 4 data-parallel x 1 pipeline"),
    ("zero2-4ranks", 4, ["--parallel.zero_stage=2"], "ZeRO stage 2, 4 data-parallel x 1 pipeline"),
    ("zero3-hpz-shard-groups-of-2-over-4", 4, ["--parallel.zero_stage=3", "--parallel.shard_group_size=2"],
     "ZeRO stage 3, 4 data-parallel x 1 pipeline, hpZ shard groups of 2"),
    ("zero3-4ranks-accumulation", 4, ["--parallel.zero_stage=3", "--train.micro_batch_size=1"],
     "ZeRO stage 3, 4 data-parallel x 1 pipeline, 2 micro-batches of 1"),
    ("pipeline-4-microbatches-activation-checkpointing", 2,
     ["--parallel.pp=2", "--parallel.microbatches=4", "--parallel.activation_checkpoint=full"],
     "ZeRO stage 1, 1 data-parallel x 2 pipeline, 4 micro-batches"),
    ("zero0-2ranks", 2, ["--parallel.zero_stage=0"], "ZeRO stage 0, 2 data-parallel x 1 pipeline"),
    ("pipeline-2-stages-x-2-replicas-by-parameters", 4,
     ["--parallel.pp=2", "--deepspeed.partition_method=parameters", "--parallel.zero_stage=1"],
     "ZeRO stage 1, 2 data-parallel x 2 pipeline"),
]


@pytest.fixture
def reference(single_process_run):
    return single_process_run[0]  # its metrics


EXPORTED = ("zero3-4ranks-accumulation", "pipeline-2-stages-x-2-replicas-by-parameters", "zero0-2ranks")
"""Layouts whose final model is exported and compared: ZeRO-3 gathers it one parameter at a time,
the pipeline engine writes each stage from that stage's writer, ZeRO-0 holds it whole."""


@pytest.mark.parametrize("name, nproc, extra, engine", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_deepspeed_layout_matches_the_single_process_loss_curve(name, nproc, extra, engine, single_process_run,
                                                                tmp_path):
    reference, ref_weights, _ = single_process_run
    got, weights, stdout = train(tmp_path / name, nproc, [*DS, *extra], export=name in EXPORTED)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for ref, mine in zip(reference, got):
        assert math.isclose(mine["loss"], ref["loss"], rel_tol=1e-4), (name, ref, mine)
        assert math.isclose(mine["grad_norm"], ref["grad_norm"], rel_tol=1e-3), (name, ref, mine)
    assert engine in stdout  # the engine DeepSpeed actually built
    if name in EXPORTED:  # the same bound as the torch layouts' (test_parallel_equivalence.py)
        assert weights.keys() == ref_weights.keys()
        worst, where = max(((weights[k] - ref_weights[k]).abs().max().item(), k) for k in ref_weights)
        assert worst < 0.01 * LR, f"{name}: {where} differs from the single-process run by {worst:.2e}"
    if "ZeRO stage 3" in engine:  # each rank held only its partition from construction on
        assert "the model was built partitioned (zero.Init)" in stdout


def test_user_deepspeed_json_wins_and_its_conflicts_are_reported(reference, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    got, _, log = train(tmp_path / "user-json", 2, [*DS, "--parallel.zero_stage=1", f"--deepspeed.config={user}"],
                        export=False, stderr=True)
    assert log.count("zero_optimization.stage: the DeepSpeed JSON sets 2, the runtime chose 1") == 1  # once
    assert "gradient_clipping:" not in log  # an equal value is no conflict
    assert "DeepSpeed engine: ZeRO stage 2" in log  # what DeepSpeed really built: the user's stage
    for ref, mine in zip(reference, got):
        assert math.isclose(mine["loss"], ref["loss"], rel_tol=1e-4)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed")
def test_deepspeed_job_started_by_plain_mpirun_trains_like_one_process(reference, tmp_path):
    # No deepspeed launcher, no torchrun: mpirun starts the ranks, the runtime maps OMPI_* to ranks.
    path = tmp_path / "metrics.jsonl"
    proc = run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", str(BIN / "llm-runtime"), "train",
                *COMMON, *DS, "--parallel.zero_stage=2", f"--metrics.jsonl={path}"],
               env=clean_env(MASTER_PORT=str(free_port())), timeout=300)
    assert "cluster mpi" in proc.stdout
    for ref, mine in zip(reference, metrics(path), strict=True):
        assert math.isclose(mine["loss"], ref["loss"], rel_tol=1e-4)
