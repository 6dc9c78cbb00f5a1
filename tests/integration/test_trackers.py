"""MLflow as users run it: a real tracking server (``mlflow server``, sqlite store) on 127.0.0.1,
a 2-rank job logging to it, and MlflowClient reading the run back."""
import math
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.procs import BIN, clean_env, free_port, kill_tree, metrics, run

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")

TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8",
        "--train.log_every=2", "--train.lr_schedule=constant", "--train.warmup_steps=0", "--metrics.mlflow=true"]


class Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> "Server":
        mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=open(self.root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
            env=clean_env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return self
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer within 120 s:\n{(self.root / 'server.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    (tmp_path / "mlflow").mkdir()
    made = Server(tmp_path / "mlflow").start()
    yield made
    made.stop()


def job(tmp_path, server, steps: int, *args, env_extra=None):
    env = clean_env(MLFLOW_TRACKING_URI=server.uri, TRAINING_JOB_NAME="tiny-llm-job",
                    AWS_SECRET_ACCESS_KEY="not-a-real-secret-9f8e7d6c5b4a", **(env_extra or {}))
    return run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", *TINY, f"--train.steps={steps}",
                f"--metrics.jsonl={tmp_path / 'm.jsonl'}", f"--checkpoint.local_dir={tmp_path / 'ck'}",
                "--checkpoint.every_steps=2", *args], timeout=300, env=env)


def test_a_job_logs_its_config_and_metrics_to_mlflow_and_a_resumed_job_continues_the_same_run(tmp_path, server):
    from mlflow.tracking import MlflowClient

    proc = job(tmp_path, server, 4)
    client = MlflowClient(server.uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny-llm-job"]  # the job's name
    (first,) = client.search_runs([experiment.experiment_id])
    assert first.info.run_name == "tiny-llm-job" and first.info.status == "FINISHED"
    assert first.data.params["train.steps"] == "4" and first.data.params["metrics.mlflow"] == "True"
    rows = metrics(tmp_path / "m.jsonl")
    history = client.get_metric_history(first.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    for key in ("tokens_per_s", "grad_norm", "lr"):
        assert math.isclose(first.data.metrics[key], rows[-1][key], rel_tol=1e-6), key
    assert [a.path for a in client.list_artifacts(first.info.run_id)] == ["report.png"]
    assert "not-a-real-secret" not in str(first.data.params) + proc.stdout + proc.stderr

    job(tmp_path, server, 6)  # resumes from the step-4 checkpoint: the same run goes on
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(again.info.run_id, "loss")] == [2, 4, 6]


def test_a_tracking_server_that_dies_mid_run_costs_one_warning_and_the_job_finishes(tmp_path, server):
    log = tmp_path / "job.log"
    env = clean_env(MLFLOW_TRACKING_URI=server.uri, TRAINING_JOB_NAME="dies")
    with open(log, "w") as sink:
        # The overhead benchmark's model (benchmarks/step_overhead.py), whose bound the loop must keep.
        proc = subprocess.Popen([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", *TINY, "--model.dim=256",
                                 "--model.layers=4", "--model.heads=8", "--train.seq_len=128", "--train.steps=30",
                                 f"--metrics.jsonl={tmp_path / 'm.jsonl'}"],
                                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not ((tmp_path / "m.jsonl").exists() and len(metrics(tmp_path / "m.jsonl")) >= 3):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            server.stop()  # the server and its workers, killed
            code = proc.wait(timeout=300)
        finally:
            kill_tree(proc)
    out = log.read_text()
    assert code == 0, out[-3000:]
    rows = metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == list(range(2, 31, 2))  # every record still reaches the JSONL
    assert out.count("metrics.mlflow: the tracker failed") == 1, out[-3000:]
    # The tracker's retries run in their own thread: the loop's own time per step stays a small
    # share of the step after the server is gone (the overhead benchmark's bound is 1%).
    after = rows[len(rows) // 2:]
    assert sum(r["overhead_s"] for r in after) / sum(r["step_time_s"] for r in after) < 0.01, after
