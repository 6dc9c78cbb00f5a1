"""Failures become prompt, explained exits: real launchers and workers (gloo), faults injected with
LLM_RUNTIME_FAULT. A hung rank in a collective on two simulated hosts is in test_sagemaker_hosts.py."""
import json
import subprocess
import time

import pytest

from llm_runtime import exitcodes
from tests.datasets import write_dataset
from tests.procs import BIN, clean_env, kill_tree, metrics, run

pytestmark = pytest.mark.slow

TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=16", "--train.batch_size=8",
        "--train.log_every=1", "--train.warmup_steps=2", "--parallel.mixed_precision=fp32"]
FAST_WATCHDOG = ["--watchdog.step_timeout_s=6", "--watchdog.exchange_s=2"]
# Distinct fake credentials: any of these in any output is a leak.
SECRETS = {"AWS_SECRET_ACCESS_KEY": "fakeSecretKeyValue/0123456789abcdef", "AWS_SESSION_TOKEN": "fakeSessionToken0123456789",
           "MY_SERVICE_PASSWORD": "fakePassword0123456789"}


def train_argv(*args, nproc=2, steps=30):
    return [str(BIN / "llm-runtime"), "train", "--nproc-per-node", str(nproc), *TINY, f"--train.steps={steps}", *args]


def run_faulted(tmp_path, argv, *, within_s, env, fault="LLM_RUNTIME_FAULT: ", startup_s=180):
    """Start the job; once its log shows the fault firing, it must exit within ``within_s`` seconds.
    Returns (exit code, log)."""
    path = tmp_path / "job.log"
    with open(path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_s
            while fault not in path.read_text():
                assert proc.poll() is None, f"exited {proc.returncode} before the fault fired:\n{path.read_text()}"
                assert time.monotonic() < deadline, f"the fault never fired:\n{path.read_text()}"
                time.sleep(0.2)
            try:
                code = proc.wait(timeout=within_s)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"still running {within_s}s after the fault:\n{path.read_text()}") from None
            return code, path.read_text()
        finally:
            kill_tree(proc)
            proc.wait(timeout=30)


def test_a_rank_hung_in_data_loading_exits_86_naming_it_and_prints_no_secret(tmp_path):
    data = tmp_path / SECRETS["AWS_SESSION_TOKEN"] / "shards"  # a credential pasted into a path gets logged
    write_dataset(data, [64, 64], seq_len=16)
    out = tmp_path / "out"
    env = clean_env(LLM_RUNTIME_FAULT="hang:rank=1,step=3,phase=data", **SECRETS)
    code, log = run_faulted(tmp_path, train_argv(f"--data.uri={data}", f"--train.output_dir={out}",
                                                    *FAST_WATCHDOG), within_s=6 + 30, env=env)
    assert code == exitcodes.STALLED, log
    failure = (out / "failure").read_text()
    for part in ("llm-runtime stalled:", "rank=1 step=3 phase=data", "suspect_ranks=1", "where=faults.py:"):
        assert part in failure, failure
    hung = json.loads((out / "failures" / "rank-00001.json").read_text())
    waiting = json.loads((out / "failures" / "rank-00000.json").read_text())
    assert (hung["phase"], hung["in_collective"], waiting["phase"], waiting["in_collective"]) == ("data", False, "step", True)
    assert "Thread 0x" in log and "in inject" in (out / "failures" / "rank-00001.stacks.txt").read_text()
    assert "exit code 86" in log and "<redacted>/shards" in log  # the data line was printed, redacted

    # Every output of the job, its files, info and a bad-input error: no secret value anywhere.
    outputs = [log] + [p.read_text() for p in out.rglob("*") if p.is_file()]
    for args in (["info"], ["info", "--json"], ["launch", "--nproc-per-node", "1", "-m", "llm_runtime", "info"],
                 ["train", f"--data.uri=/missing/{SECRETS['MY_SERVICE_PASSWORD']}"]):
        proc = run([str(BIN / "llm-runtime"), *args], timeout=120, check=False, env=clean_env(**SECRETS))
        assert proc.returncode == (2 if args[0] == "train" else 0), proc.stderr
        assert "AWS_SESSION_TOKEN" not in proc.stdout or args[0] == "train"  # not even listed
        outputs.append(proc.stdout + proc.stderr)
    assert "/missing/<redacted>" in outputs[-1]
    for text in outputs:
        for name, value in SECRETS.items():
            assert value not in text, f"{name} leaked:\n{text[:3000]}"


def test_a_stuck_checkpoint_upload_exits_86_at_its_deadline_naming_phase_checkpoint(tmp_path):
    out = tmp_path / "out"
    env = clean_env(LLM_RUNTIME_FAULT="hang:rank=0,phase=checkpoint")
    code, log = run_faulted(
        tmp_path, train_argv(f"--checkpoint.uri={tmp_path / 'ck'}", "--checkpoint.every_steps=2",
                             "--checkpoint.upload_timeout_s=5", f"--train.output_dir={out}", steps=400),
        within_s=5 + 30, env=env)
    assert code == exitcodes.STALLED, log
    failure = (out / "failure").read_text()
    # The node's upload is its commit agent's (in the launcher), which every rank of the node waits on:
    # the record names that commit and the node's ranks; which rank reports it first is a race.
    assert "phase=checkpoint" in failure and "suspect_ranks=0" in failure, failure
    assert "commit of node 0's checkpoint (step 2)" in failure, failure
    assert "did not finish within 5s (checkpoint.upload_timeout_s)" in failure  # its own deadline, not the step's


def test_a_rank_killed_mid_run_restarts_from_its_checkpoint_and_ends_with_the_uninterrupted_loss(tmp_path):
    common = ["--checkpoint.every_steps=2", "--metrics.jsonl={}"]

    def job(name, *extra, **env):
        args = [a.format(tmp_path / f"{name}.jsonl") for a in common]
        proc = run(train_argv(f"--checkpoint.uri={tmp_path / name}", f"--train.output_dir={tmp_path / name}-out",
                              *args, *extra, steps=8), timeout=300, check=False, env=clean_env(**env))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return metrics(tmp_path / f"{name}.jsonl"), proc.stdout + proc.stderr

    clean, clean_log = job("clean", "--health.preflight=true")
    assert "health: 2 ranks on 1 hosts, 0 bad" in clean_log  # the pre-flight check passes on CPU (gloo)
    crashed, log = job("crashed", "--max-restarts", "1", LLM_RUNTIME_FAULT="kill:rank=0,step=5")
    assert "resumed from checkpoint step" in log and "exitcode: -9" in log, log
    assert crashed[-1]["step"] == clean[-1]["step"] == 8
    assert crashed[-1]["loss"] == clean[-1]["loss"] and crashed[-1]["grad_norm"] == clean[-1]["grad_norm"]


@pytest.mark.parametrize("fault,code,expected", [
    ("slow:rank=1,phase=health", exitcodes.OK, "straggler rank 1 on "),
    ("corrupt:rank=1,phase=health", exitcodes.BAD_NODE, "bad rank 1 on "),
])
def test_healthcheck_names_a_slow_rank_and_fails_a_wrong_result_with_the_bad_node_code(tmp_path, fault, code, expected):
    out = tmp_path / "out"
    proc = run([str(BIN / "llm-runtime"), "healthcheck", "--nproc-per-node", "2", f"--train.output_dir={out}"],
               timeout=180, check=False, env=clean_env(LLM_RUNTIME_FAULT=fault))
    log = proc.stdout + proc.stderr
    assert proc.returncode == code and expected in log, log
    report = json.loads((out / "health.json").read_text())
    if code == exitcodes.OK:
        assert report["ok"] and [s["rank"] for s in report["stragglers"]] == [1] and report["stragglers"][0]["ratio"] > 3
        assert not (out / "failure").exists()
    else:
        assert not report["ok"] and report["bad"] == [1]
        failure = (out / "failure").read_text()
        assert "llm-runtime bad-node:" in failure and "rank 1 (" in failure and "matmul" in failure, failure
        assert "exit code 87" in log


def test_a_sigterm_before_any_worker_starts_exits_143_in_one_line(tmp_path):
    """The platform may stop a job while its hosts still check and stage (here: a launcher held by
    LLM_RUNTIME_FAULT=hang:phase=launch, after the job's checks, before torchrun): the launcher
    handles SIGTERM from its first line and exits 143 at once, no worker ever started."""
    path = tmp_path / "job.log"
    env = clean_env(LLM_RUNTIME_FAULT="hang:phase=launch")
    with open(path, "w") as log:
        proc = subprocess.Popen(train_argv(steps=2), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while "in phase launch" not in path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
                time.sleep(0.2)
            proc.send_signal(subprocess.signal.SIGTERM)
            code = proc.wait(timeout=20)
        finally:
            kill_tree(proc)
    text = path.read_text()
    assert code == 143, text
    assert text.count("SIGTERM before the workers started") == 1 and "[rank 0]" not in text, text


@pytest.mark.stragglers_expected
def test_a_straggler_with_stragglers_fail_ends_the_job_87_with_a_record_naming_its_host(tmp_path):
    out = tmp_path / "out"
    argv = [str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", "--model.dim=256", "--model.layers=4",
            "--model.heads=8", "--train.seq_len=128", "--train.batch_size=4", "--train.log_every=5",
            "--train.steps=200", "--watchdog.stragglers=fail", "--watchdog.straggler_every=5",
            f"--train.output_dir={out}"]
    env = clean_env(LLM_RUNTIME_FAULT="slow:rank=1,factor=4,phase=step")
    proc = run(argv, timeout=240, env=env, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == exitcodes.BAD_NODE, log
    failure = (out / "failure").read_text()
    assert failure.startswith("llm-runtime straggler: host=") and "rank=1 " in failure, failure
    assert "watchdog.stragglers=fail" in failure, failure
    record = json.loads((out / "failures" / "rank-00000.json").read_text())  # rank 0 judged and wrote it
    assert (record["kind"], record["rank"]) == ("straggler", 1)
    assert record["step"] < 200 and record["step"] % 5 == 0
