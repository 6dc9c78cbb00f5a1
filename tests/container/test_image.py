"""The CPU image, run the way SageMaker runs an image: real Docker containers on host networking,
each SageMaker host its own hostname and 127.0.1.x address (llm-runtime local-job), S3 from moto on
127.0.0.1. Nothing leaves 127.0.0.0/8: no bridge network is ever used."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.procs import BIN, REPO, clean_env, free_port, run

# The first test also builds the image (the session fixture): about 2 minutes, inside its timeout.
pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(900)]

AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
       "AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
TINY = {"model.dim": 64, "model.layers": 2, "model.heads": 4, "train.seq_len": 32, "train.batch_size": 8,
        "train.log_every": 1, "train.warmup_steps": 1, "parallel.mixed_precision": "fp32", "launch.nproc_per_node": 1}


def docker_run(image, *args, env=(), volumes=(), timeout=300):
    argv = ["docker", "run", "--rm", "--network", "host"]
    for name in env:
        argv += ["-e", name]
    for volume in volumes:
        argv += ["-v", volume]
    return subprocess.run([*argv, image, *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env())


def test_the_image_answers_info_and_healthcheck_with_the_suites_torch(image):
    info = docker_run(image, "info", "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["cluster"]["kind"] in ("local", "torchrun")
    port = free_port(span=2)
    health = subprocess.run(["docker", "run", "--rm", "--network", "host", "-e", f"MASTER_PORT={port}", image,
                             "healthcheck", "--nproc-per-node", "2"], capture_output=True, text=True, timeout=300)
    assert health.returncode == 0, health.stdout + health.stderr
    assert "2 ranks on 1 hosts, 0 bad" in health.stdout + health.stderr
    version = subprocess.run(["docker", "run", "--rm", "--network", "host", "--entrypoint", "python", image, "-c",
                              "import torch; print(torch.__version__)"], capture_output=True, text=True, timeout=120)
    import torch

    assert version.stdout.strip() == torch.__version__


def test_a_processing_job_in_the_image_writes_token_shards_to_s3(image, s3, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "corpus.txt").write_text((REPO / "llm_runtime/models/data/bundled.txt").read_text())
    done = docker_run(image, "prepare-data", "--input", "/data/in/corpus.txt", "--output", s3.url("shards"),
                      "--seq-len", "32", "--shard-size", "64KB", env=AWS, volumes=[f"{tmp_path}:/data:ro"])
    assert done.returncode == 0, done.stdout + done.stderr
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="shards/")["Contents"]]
    assert "shards/index.json" in keys and any(k.endswith(".tar") for k in keys), keys
    assert "fake-secret-never-printed" not in done.stdout + done.stderr


def test_mpi_across_two_containers_reaches_four_ranks_over_ssh_with_keys_made_for_the_job(image, tmp_path):
    """SageMaker's MPI integration (sagemaker_mpi_enabled): the first host's mpirun reaches the
    second container over ssh. No key is in the image: each host makes its own at start and only
    the public halves travel (the job's store); each sshd listens on its host's own 127.0.1.x."""
    from tests.procs import read_rank_reports

    code = tmp_path / "code"
    code.mkdir()
    (code / "report.py").write_text((REPO / "tests" / "workers" / "report.py").read_text())
    hyper = {"sagemaker_program": "report.py", "sagemaker_mpi_enabled": True,
             "sagemaker_mpi_num_of_processes_per_host": 2, "out": "/opt/ml/output/data"}
    port = free_port(span=2)
    argv = [str(BIN / "llm-runtime"), "local-job", "--image", image, "--hosts", "2", "--workdir", str(tmp_path / "job"),
            "--job", f"lrt-mpi-{port}", "--timeout", "300", "--code", str(code), "--env", "MASTER_PORT",
            *[f"--hp={k}={json.dumps(v)}" for k, v in hyper.items()]]
    done = run(argv, timeout=400, check=False, env=clean_env(MASTER_PORT=str(port)))
    logs = "".join((tmp_path / "job" / f"{h}.log").read_text() for h in ("algo-1", "algo-2"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    reports = sorted([*read_rank_reports(tmp_path / "job" / "algo-1" / "output" / "data", 2),
                      *read_rank_reports(tmp_path / "job" / "algo-2" / "output" / "data", 2)],
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]
    assert [r["hostname"] for r in reports] == ["algo-1", "algo-1", "algo-2", "algo-2"]  # each on its container
    assert {r["kind"] for r in reports} == {"mpi"} and [r["sum"] for r in reports] == [10.0] * 4
    listing = subprocess.run(["docker", "run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c",
                              "ls /etc/ssh/ssh_host_* /root/.ssh 2>/dev/null | wc -l"], capture_output=True, text=True,
                             timeout=120)
    assert listing.stdout.strip() == "0", "the image holds no ssh key"


STEPS = 100  # the stop lands about 4 steps after step 5 (0.05 s a step here); the other jobs run the rest


def local_job(image, tmp_path, name, hyper, port, *extra):
    return [str(BIN / "llm-runtime"), "local-job", "--image", image, "--hosts", "2", "--workdir", str(tmp_path / name),
            "--job", f"lrt-{name}-{port}", "--timeout", "400", *[f"--hp={k}={json.dumps(v)}" for k, v in hyper.items()],
            *[f"--env={n}" for n in (*AWS, "MASTER_PORT")], *extra]


def test_two_containers_on_s3_shards_stopped_by_docker_stop_save_exit_143_and_fresh_ones_continue_exactly(
        image, s3, tmp_path):
    """Two containers train on S3 token shards, checkpointing to S3 (moto on 127.0.0.1). SageMaker's
    stop: SIGTERM to every container's PID 1 (tini), a grace period, then SIGKILL. The launchers
    ask the workers to save at their next step; both hosts exit 143 with the checkpoint committed;
    a job in fresh containers resumes there, repeats the uninterrupted run's losses exactly and
    leaves the model in host 1's /opt/ml/model."""
    from tests.procs import metrics

    run([str(BIN / "llm-runtime"), "prepare-data", "--input", str(REPO / "llm_runtime/models/data/bundled.txt"),
         "--output", s3.url("tokens"), "--seq-len", "32", "--shard-size", "64KB"], timeout=120, env=clean_env())
    hyper = {**TINY, "train.steps": STEPS, "data.uri": s3.url("tokens"), "checkpoint.uri": s3.url("ck"),
             "checkpoint.every_steps": 100000}
    port = free_port(span=2)
    env = clean_env(MASTER_PORT=str(port))
    first = subprocess.Popen(local_job(image, tmp_path, "first", hyper, port), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    jsonl = tmp_path / "first" / "algo-1" / "output" / "data" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while not (jsonl.exists() and any(m["step"] >= 5 for m in metrics(jsonl))):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else "slow"
            time.sleep(0.2)
        stop = subprocess.run(["docker", "stop", "-t", "120", f"lrt-first-{port}-algo-1", f"lrt-first-{port}-algo-2"],
                              capture_output=True, text=True, timeout=200)
        assert stop.returncode == 0, stop.stderr
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    summary = json.loads((tmp_path / "first" / "local-job.json").read_text())
    logs = "".join((tmp_path / "first" / f"{h}.log").read_text() for h in ("algo-1", "algo-2"))
    assert [summary[h]["exit_code"] for h in ("algo-1", "algo-2")] == [143, 143], out + logs
    manifests = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="ck/").get("Contents", [])
                 if o["Key"].endswith("/manifest.json")]
    assert len(manifests) == 1, (manifests, logs)
    saved = int(manifests[0].split("/step-")[1].split("/")[0])
    assert 5 <= saved < STEPS
    resumed = run(local_job(image, tmp_path, "resumed", hyper, port), timeout=500, check=False, env=env)
    resumed_logs = (tmp_path / "resumed" / "algo-1.log").read_text()
    assert resumed.returncode == 0 and f"resumed from checkpoint step {saved}" in resumed_logs, resumed.stdout + resumed_logs
    summary = json.loads((tmp_path / "resumed" / "local-job.json").read_text())
    assert "model.safetensors.index.json" in summary["algo-1"]["model"] and summary["algo-2"]["model"] == []
    resource = json.loads((tmp_path / "resumed" / "algo-2" / "input" / "config" / "resourceconfig.json").read_text())
    assert resource["current_host"] == "algo-2" and resource["network_interface_name"] == "lo"
    assert "fake-secret-never-printed" not in logs + resumed_logs + resumed.stdout
    # The uninterrupted reference: the same schedule (train.steps), no stop.
    reference = run(local_job(image, tmp_path, "reference", {**hyper, "checkpoint.uri": s3.url("other")}, port),
                    timeout=500, check=False, env=env)
    assert reference.returncode == 0, reference.stdout
    want = {m["step"]: m["loss"] for m in metrics(tmp_path / "reference" / "algo-1" / "output" / "data" / "metrics.jsonl")}
    got = [m for m in metrics(tmp_path / "resumed" / "algo-1" / "output" / "data" / "metrics.jsonl") if m["step"] > saved]
    assert [m["step"] for m in got] == list(range(saved + 1, STEPS + 1))
    assert all(m["loss"] == want[m["step"]] for m in got), [(m["step"], m["loss"], want[m["step"]]) for m in got[:5]]
