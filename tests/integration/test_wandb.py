"""Weights & Biases as users run it offline: a 2-rank job writes a W&B run (WANDB_MODE=offline,
nothing leaves the machine), read back with the pinned wandb's own reader (``wandb leet inspect``)."""
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from tests.procs import BIN, clean_env, metrics, run

pytestmark = pytest.mark.slow
wandb = pytest.importorskip("wandb")

TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8",
        "--train.log_every=2", "--train.lr_schedule=constant", "--train.warmup_steps=0", "--metrics.wandb=true"]
SECRET = "not-a-real-secret-9f8e7d6c5b4a"


def wandb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "wandb-home"
    return clean_env(TRAINING_JOB_NAME="tiny-llm-job", AWS_SECRET_ACCESS_KEY=SECRET, WANDB_ERROR_REPORTING="false",
                     WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
                     WANDB_DATA_DIR=str(home / "data"), **extra)


def job(tmp_path: Path, steps: int, env: dict, check: bool = True):
    return run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", *TINY, f"--train.steps={steps}",
                f"--metrics.jsonl={tmp_path / 'out' / 'm.jsonl'}", f"--checkpoint.local_dir={tmp_path / 'ck'}",
                "--checkpoint.every_steps=2"], timeout=300, env=env, check=check)


def inspect(run_dir: Path) -> dict:
    """The run as the pinned wandb reads its transaction log (state, config, summary)."""
    wandb_bin = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    shown = run([wandb_bin, "leet", "inspect", "--summary", "--json", str(run_dir)], timeout=120,
                env=clean_env(WANDB_ERROR_REPORTING="false"))
    return json.loads(shown.stdout)


def test_an_offline_wandb_run_holds_the_config_and_its_summary_is_the_last_metrics_row(tmp_path):
    env = wandb_env(tmp_path, WANDB_MODE="offline")
    proc = job(tmp_path, 4, env)
    (first_dir,) = sorted((tmp_path / "out" / "wandb").glob("offline-run-*"))  # beside the metrics JSONL
    first = inspect(first_dir)
    assert first["state"] == "finished" and first["project"] == "tiny-llm-job" and first["name"] == "tiny-llm-job"
    assert first["config"]["train.steps"] == "4" and first["config"]["metrics.wandb"] == "True"
    rows = metrics(tmp_path / "out" / "m.jsonl")
    last = rows[-1]
    assert first["summary"]["step"] == last["step"] == 4
    numbers = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v)}
    assert {"loss", "tokens_per_s", "grad_norm", "lr"} <= set(numbers)
    for key, value in numbers.items():
        assert math.isclose(first["summary"][key], value, rel_tol=1e-6, abs_tol=1e-12), key
    assert (first_dir / "files" / "report.png").is_file()  # the report image is saved with the run
    shown = json.dumps(first) + proc.stdout + proc.stderr
    assert SECRET not in shown and SECRET not in (first_dir / "run-{}.wandb".format(first["run_id"])).read_text(
        errors="replace")

    job(tmp_path, 6, env)  # resumes from the step-4 checkpoint: the same W&B run id goes on
    dirs = sorted((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and dirs[0] == first_dir
    again = inspect(dirs[1])
    assert again["run_id"] == first["run_id"] and again["state"] == "finished"
    assert again["summary"]["step"] == 6
    assert math.isclose(again["summary"]["loss"], metrics(tmp_path / "out" / "m.jsonl")[-1]["loss"], rel_tol=1e-6)


def test_wandb_without_an_explicit_mode_is_refused_before_any_worker_starts(tmp_path):
    proc = job(tmp_path, 4, wandb_env(tmp_path), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "metrics.wandb=true needs WANDB_MODE set explicitly" in proc.stderr
    assert not (tmp_path / "out" / "m.jsonl").exists() and not (tmp_path / "out" / "wandb").exists()
