"""The CPU image, run the way SageMaker runs an image: real Docker containers on host networking,
each SageMaker host its own hostname and 127.0.1.x address (llm-runtime local-job), S3 from moto on
127.0.0.1. Nothing leaves 127.0.0.0/8: no bridge network is ever used."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.procs import BIN, REPO, clean_env, free_port, run

pytestmark = [pytest.mark.container, pytest.mark.slow]

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


def test_two_containers_train_from_s3_shards_checkpoint_to_s3_and_host_1_holds_the_model(image, s3, tmp_path):
    run([str(BIN / "llm-runtime"), "prepare-data", "--input", str(REPO / "llm_runtime/models/data/bundled.txt"),
         "--output", s3.url("tokens"), "--seq-len", "32", "--shard-size", "64KB"], timeout=120, env=clean_env())
    hyper = {**TINY, "train.steps": 4, "data.uri": s3.url("tokens"), "checkpoint.uri": s3.url("ck"),
             "checkpoint.every_steps": 2}
    port = free_port(span=2)
    argv = [str(BIN / "llm-runtime"), "local-job", "--image", image, "--hosts", "2", "--workdir", str(tmp_path / "job"),
            "--job", f"lrt-train-{port}", "--timeout", "400", *[f"--hp={k}={json.dumps(v)}" for k, v in hyper.items()],
            *[f"--env={name}" for name in (*AWS, "MASTER_PORT")]]
    done = run(argv, timeout=500, check=False, env=clean_env(MASTER_PORT=str(port)))
    summary = json.loads((tmp_path / "job" / "local-job.json").read_text())
    logs = "".join((tmp_path / "job" / f"{h}.log").read_text() for h in ("algo-1", "algo-2"))
    assert done.returncode == 0 and [summary[h]["exit_code"] for h in ("algo-1", "algo-2")] == [0, 0], \
        done.stdout + done.stderr + logs
    assert "model.safetensors.index.json" in summary["algo-1"]["model"] and summary["algo-2"]["model"] == []
    manifests = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="ck/").get("Contents", [])
                 if o["Key"].endswith("/manifest.json")]
    assert len(manifests) == 2, manifests  # steps 2 and 4
    resource = json.loads((tmp_path / "job" / "algo-2" / "input" / "config" / "resourceconfig.json").read_text())
    assert resource["current_host"] == "algo-2" and resource["network_interface_name"] == "lo"
    assert "fake-secret-never-printed" not in logs + done.stdout + done.stderr
