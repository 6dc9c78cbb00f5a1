"""Checkpoints end to end: real workers, real DCP / DeepSpeed files, a real S3 server (moto over HTTP
on 127.0.0.1, through the fault proxy). A job is "killed" the way a host dies: its rank 0 hangs at
a step (LLM_RUNTIME_FAULT), the test waits for the checkpoint it expects, then SIGKILLs the tree.
"""
import math
import os
import re
import subprocess
import time

import pytest
import torch

from tests.procs import BIN, clean_env, kill_tree, metrics, run

pytestmark = pytest.mark.slow

# A rank that hangs unexpectedly ends its job with stacks and a failure record within 90-150 s (before
# the test's own timeout), so a rare hang in CI can be diagnosed from the test's output.
TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8",
        "--train.log_every=1", "--train.warmup_steps=2", "--parallel.mixed_precision=fp32",
        "--watchdog.first_timeout_s=150", "--watchdog.step_timeout_s=90"]


def command(tmp_path, name, *args, nproc=2, steps=10):
    return [str(BIN / "llm-runtime"), "train", "--nproc-per-node", str(nproc), *TINY, f"--train.steps={steps}",
            f"--metrics.jsonl={tmp_path / name}.jsonl", *args]


def train(tmp_path, name, *args, nproc=2, steps=10, timeout=240, check=True, **env):
    proc = run(command(tmp_path, name, *args, nproc=nproc, steps=steps), timeout=timeout, check=check,
               env=clean_env(**env))
    (tmp_path / f"{name}.out").write_text(proc.stdout + proc.stderr)  # kept for a failure's diagnosis
    return (metrics(tmp_path / f"{name}.jsonl") if (tmp_path / f"{name}.jsonl").exists() else []), proc


def hang_and_kill(tmp_path, name, *args, until, nproc=2, steps=10, hang_step=7, timeout=180):
    """Start the job with rank 0 hanging at ``hang_step``; once ``until()`` holds, kill every process."""
    env = clean_env(LLM_RUNTIME_FAULT=f"hang:rank=0,step={hang_step}")
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(command(tmp_path, name, *args, nproc=nproc, steps=steps), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not until():
            assert proc.poll() is None, f"the job exited ({proc.returncode}):\n{(tmp_path / f'{name}.log').read_text()}"
            assert time.monotonic() < deadline, f"timed out:\n{(tmp_path / f'{name}.log').read_text()}"
            time.sleep(0.2)
    finally:
        kill_tree(proc)
        proc.wait(timeout=30)
        log.close()
    return metrics(tmp_path / f"{name}.jsonl")


def saved_and_ran_on(s3, tmp_path, name, step):
    """``until`` for hang_and_kill: one checkpoint is in S3 and the job has logged ``step``: the steps
    after the checkpoint that it ran are the uninterrupted run's, for the resumed job to reproduce."""
    path = tmp_path / f"{name}.jsonl"
    return lambda: (len(manifests(s3)) == 1 and path.exists()
                    and any(m["step"] >= step for m in metrics(path)))


def manifests(s3, prefix="ck/"):
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listed if o["Key"].endswith("/manifest.json"))


def objects_of_step(s3, step, prefix="ck/"):
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listed if f"/step-{step:09d}/" in o["Key"])


def assert_same_tail(full, resumed, first_step):
    tail = [m for m in full if m["step"] >= first_step]
    assert [m["step"] for m in resumed] == [m["step"] for m in tail]
    for a, b in zip(tail, resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], (a, b)


@pytest.mark.parametrize("layout,nproc", [
    ([], 2),                                                             # FSDP2
    (["--parallel.dp_replicate=2", "--parallel.dp_shard=1"], 2),  # replicas only (DDP): its names differ
    (["--parallel.pp=2", "--parallel.tp=2"], 4),  # pipeline stages x tensor shards (FSDP: the case above)
])
def test_a_killed_job_resumes_from_its_s3_checkpoint_exactly_as_if_never_stopped(tmp_path, s3, layout, nproc):
    """Steps 6-8 of the killed job are the uninterrupted run's: the resumed job repeats them bit for bit
    (loss, grad norm, lr: the weights, the optimizer state and the schedule all came back)."""
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_steps=5", *layout]
    first = hang_and_kill(tmp_path, "first", *ck, nproc=nproc, hang_step=9,
                          until=saved_and_ran_on(s3, tmp_path, "first", 8))
    assert manifests(s3)[0].endswith("/step-000000005/manifest.json")
    assert len(objects_of_step(s3, 5)) == 2  # one node: its tar and the manifest
    resumed, proc = train(tmp_path, "resumed", *ck, nproc=nproc)
    assert "resumed from checkpoint step 5" in proc.stdout + proc.stderr
    assert [m["step"] for m in resumed] == [6, 7, 8, 9, 10]
    assert_same_tail(first, resumed[:3], 6)


def test_deepspeed_zero3_resumes_exactly_from_its_checkpoint(tmp_path, s3):
    ds = ["--parallel.backend=deepspeed", "--parallel.zero_stage=3"]
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_steps=5", *ds]
    first = hang_and_kill(tmp_path, "first", *ck, hang_step=9, until=saved_and_ran_on(s3, tmp_path, "first", 8))
    (tmp_path / "local").rename(tmp_path / "gone")  # a fresh host: every file comes from S3, verified
    resumed, proc = train(tmp_path, "resumed", *ck)
    assert "resumed from checkpoint step 5" in proc.stdout + proc.stderr
    assert [m["step"] for m in resumed] == [6, 7, 8, 9, 10]
    assert_same_tail(first, resumed[:3], 6)


DS_ZERO2 = ["--parallel.backend=deepspeed", "--parallel.zero_stage=2"]


@pytest.mark.parametrize("before,after,partitions", [
    # TP2 (one replica) -> FSDP over 4: growing the data-parallel size needs a partition count
    # every size divides, set up front.
    ((2, ["--parallel.tp=2"]), (4, []), ["--data.num_partitions=4"]),
    # PP2 (one replica) -> FSDP over 2: each stage's parameters, by their unsplit names, resharded.
    ((2, ["--parallel.pp=2"]), (2, []), ["--data.num_partitions=2"]),
    # DeepSpeed ZeRO-2 on 2 -> 4 ranks: converted to DeepSpeed's universal checkpoint, from a fresh disk.
    ((2, DS_ZERO2), (4, DS_ZERO2), ["--data.num_partitions=4"]),
], ids=["tp2-to-fsdp4", "pp2-to-fsdp2", "deepspeed-zero2-2-to-4-universal"])
def test_a_checkpoint_resumes_on_another_layout_and_number_of_ranks_with_its_data_position(tmp_path, s3, before,
                                                                                            after, partitions):
    from tests.datasets import write_dataset

    write_dataset(tmp_path / "shards", (30, 25, 41, 19, 33), seq_len=32)  # token shards: a real data position
    data = [f"--data.uri={tmp_path / 'shards'}", "--data.shuffle_block=8", *partitions]
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_steps=5", *data]
    (nproc_before, layout_before), (nproc_after, layout_after) = before, after
    first = hang_and_kill(tmp_path, "first", *ck, *layout_before, nproc=nproc_before, hang_step=9,
                          until=saved_and_ran_on(s3, tmp_path, "first", 8))
    if layout_after == DS_ZERO2:
        (tmp_path / "local").rename(tmp_path / "gone")  # a fresh host: every node's objects come from S3
    resumed, proc = train(tmp_path, "resumed", *ck, *layout_after, nproc=nproc_after)
    out = proc.stdout + proc.stderr
    assert "resumed from checkpoint step 5" in out
    if layout_after == DS_ZERO2:
        assert "converted from 2 DeepSpeed ranks to a universal checkpoint" in out
        assert not list((tmp_path / "local").rglob("ds-universal")), "the converted copy is deleted after loading"
    tail = [m for m in first if m["step"] >= 6]
    assert [m["step"] for m in resumed] == [6, 7, 8, 9, 10] and [m["step"] for m in tail][:3] == [6, 7, 8]
    for a, b in zip(tail, resumed):  # same samples, same weights; only the reduction order differs
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)


def test_a_corrupt_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, s3):
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_steps=3", "--checkpoint.keep=3", "--train.lr_schedule=constant"]
    full, _ = train(tmp_path, "first", *ck, steps=6)
    assert [k.split("/")[-2] for k in manifests(s3)] == ["step-000000003", "step-000000006"]
    (tar,) = [k for k in objects_of_step(s3, 6) if k.endswith(".tar")]
    body = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=tar)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.client.put_object(Bucket=s3.bucket, Key=tar, Body=bytes(body))
    (tmp_path / "local").rename(tmp_path / "gone")
    verify = run([str(BIN / "llm-runtime"), "checkpoints", "verify", "s3://test-bucket/ck"], timeout=60, check=False)
    assert verify.returncode == 1 and "step 6:" in verify.stderr and "does not match the manifest" in verify.stderr
    assert "step 3: ok" in verify.stdout
    resumed, proc = train(tmp_path, "resumed", *ck, steps=8)
    out = proc.stdout + proc.stderr
    (fallback,) = [line for line in out.splitlines() if "checkpoint step 6 is corrupt" in line]
    assert "ERROR" in fallback and "does not match its checksum" in fallback  # loud, and says why
    assert "resumed from checkpoint step 3" in out
    assert [m["step"] for m in resumed] == [4, 5, 6, 7, 8]
    assert_same_tail(full, resumed[:3], 4)  # steps 4-6 as the first job ran them (constant lr)
    # Saved again at 6 under a new name; the corrupt object is gone, the new one verifies.
    assert len([k for k in objects_of_step(s3, 6) if k.endswith(".tar")]) == 1
    verify = run([str(BIN / "llm-runtime"), "checkpoints", "verify", "s3://test-bucket/ck"], timeout=60, check=False)
    assert verify.returncode == 0 and "step 6: ok" in verify.stdout, verify.stdout + verify.stderr


def test_a_job_killed_during_an_upload_commits_that_checkpoint_when_the_host_starts_again(tmp_path, s3_proxy, s3):
    """The whole job dies, launcher and its commit agent too, while step 10 goes up; its local files
    and every rank's done marker are complete. The host's next attempt on the same disk commits
    step 10 first and resumes there."""
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_steps=5", "--checkpoint.upload_timeout_s=120"]

    def second_upload_under_way():
        if len(manifests(s3)) == 1 and not s3_proxy.fault_rate:
            s3_proxy.only_methods, s3_proxy.faults, s3_proxy.fault_rate = {"PUT"}, ("slowdown",), 1.0
            s3_proxy.reset_counts()
        return s3_proxy.faults_injected["slowdown"] >= 2  # step 10's upload is failing and retrying

    hang_and_kill(tmp_path, "first", *ck, steps=14, hang_step=12, until=second_upload_under_way)
    s3_proxy.fault_rate = 0.0
    # Step 10 never got a manifest: not a checkpoint yet.
    assert [k.split("/")[-2] for k in manifests(s3)] == ["step-000000005"]
    listing = run([str(BIN / "llm-runtime"), "checkpoints", "list", "s3://test-bucket/ck"], timeout=60)
    assert "complete" in listing.stdout
    resumed, proc = train(tmp_path, "resumed", *ck, steps=14)
    out = proc.stdout + proc.stderr
    assert "checkpoint step 10 was saved on every node but never committed: committing it now" in out
    assert "resumed from checkpoint step 10" in out and "commit did not finish" not in out  # no wait on a dead agent
    assert [m["step"] for m in resumed] == list(range(11, 15))
    assert [k.split("/")[-2] for k in manifests(s3)] == ["step-000000010", "step-000000014"]  # keep=2


def test_retention_keeps_the_newest_checkpoints_locally_and_in_s3(tmp_path, s3):
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_steps=2", "--checkpoint.keep=2"]
    _, proc = train(tmp_path, "run", *ck, steps=8)
    assert [k.split("/")[-2] for k in manifests(s3)] == ["step-000000006", "step-000000008"]
    (node,) = (tmp_path / "local").glob("run-*/node-00000")
    assert sorted(p.name for p in node.iterdir() if p.name.startswith("step-")) == ["step-000000006",
                                                                                    "step-000000008"]
    assert "checkpoint step=8 blocked_s=" in proc.stdout + proc.stderr
    again, proc = train(tmp_path, "again", *ck, steps=8)  # nothing left: the job says so and ends
    log = proc.stdout + proc.stderr
    assert again == [] and "done: nothing to train, the checkpoint's step 8 reaches train.steps=8" in log
    assert "final_loss" not in log


@pytest.mark.parametrize("layout,nproc", [
    (["--parallel.pp=2"], 4),                                              # two stages, two replicas
])  # DeepSpeed's exports (ZeRO-3, pipeline, ZeRO-0) equal this same format: test_deepspeed_equivalence.py
def test_the_final_model_loads_with_from_pretrained_and_gives_the_runtimes_logits(tmp_path, layout, nproc):
    """train.model_dir in Hugging Face format: safetensors files (at least one per pipeline stage: each
    stage's writer writes its own), the index, config.json; AutoModelForCausalLM loads every tensor
    (nothing missing or unexpected), and its logits equal the bundled model's with the same weights."""
    import json

    transformers = pytest.importorskip("transformers")
    from llm_runtime.models import Llama, LlamaConfig
    from tests.exported import as_bundled, exported

    train(tmp_path, "run", *layout, f"--train.model_dir={tmp_path / 'model'}", "--train.model_shard_mb=1",
          nproc=nproc, steps=3)
    model_dir = tmp_path / "model"
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) == (2 if "--parallel.pp=2" in layout else 1)
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (model_dir / "generation_config.json").is_file()
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    config = LlamaConfig(dim=64, layers=2, heads=4, max_seq_len=32)
    ours = Llama(config)
    ours.load_state_dict(as_bundled(exported(model_dir), config), strict=True)
    initial = Llama(config)
    initial.init_weights(torch.Generator().manual_seed(1234))
    assert not torch.equal(ours.output.weight, initial.output.weight)  # trained, not initial
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf.eval()(tokens).logits, ours(tokens), atol=1e-5, rtol=0)


def _start(tmp_path, name, *args, steps=100000, **env):
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(command(tmp_path, name, *args, steps=steps), env=clean_env(**env), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_for_step(tmp_path, name, proc, step, timeout=120):
    deadline = time.monotonic() + timeout
    path = tmp_path / f"{name}.jsonl"
    while not (path.exists() and any(m["step"] >= step for m in metrics(path))):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
        time.sleep(0.2)


def test_sigterm_on_the_launcher_saves_at_the_next_step_and_the_job_resumes_there(tmp_path, s3):
    import signal

    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}"]
    proc, log = _start(tmp_path, "first", *ck)
    try:
        _wait_for_step(tmp_path, "first", proc, 3)
        proc.send_signal(signal.SIGTERM)  # the platform's stop / spot interruption, to PID 1
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        kill_tree(proc)
        log.close()
    out = (tmp_path / "first.log").read_text()
    last = metrics(tmp_path / "first.jsonl")[-1]["step"]
    assert f"stop requested by the launcher: saved step {last}, stopping" in out
    assert manifests(s3)[-1].endswith(f"/step-{last:09d}/manifest.json")
    resumed, proc = train(tmp_path, "resumed", *ck, steps=last + 2)
    assert f"resumed from checkpoint step {last}" in proc.stdout + proc.stderr
    assert [m["step"] for m in resumed] == [last + 1, last + 2]


def test_workers_that_cannot_stop_are_torn_down_at_the_stop_deadline(tmp_path):
    import signal

    ck = [f"--checkpoint.local_dir={tmp_path / 'local'}", "--launch.stop_deadline_s=3"]
    proc, log = _start(tmp_path, "stuck", *ck, LLM_RUNTIME_FAULT="hang:rank=1,step=4")
    try:
        _wait_for_step(tmp_path, "stuck", proc, 3)
        time.sleep(1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert time.monotonic() - sent < 3 + 30  # the deadline, then the agent's teardown
    finally:
        kill_tree(proc)
        log.close()
    assert "did not stop within 3s of SIGTERM" in (tmp_path / "stuck.log").read_text()


def test_a_workers_own_sigterm_means_exit_now_not_a_save(tmp_path):
    import signal

    from tests.procs import descendants

    ck = [f"--checkpoint.local_dir={tmp_path / 'local'}"]
    proc, log = _start(tmp_path, "teardown", *ck)
    try:
        _wait_for_step(tmp_path, "teardown", proc, 3)
        workers = [p for p in descendants(proc.pid) if b"llm_runtime" in open(f"/proc/{p}/cmdline", "rb").read()]
        for pid in workers:
            os.kill(pid, signal.SIGTERM)  # what torchrun does when it tears the workers down
        assert proc.wait(timeout=60) not in (0, 128 + signal.SIGTERM)
    finally:
        kill_tree(proc)
        log.close()
    assert "stop requested" not in (tmp_path / "teardown.log").read_text()
    assert not list((tmp_path / "local").glob("run-*/node-*/step-*"))


def test_resume_can_name_one_checkpoint_of_another_run(tmp_path, s3):
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_steps=3", "--train.lr_schedule=constant"]
    train(tmp_path, "first", *ck, steps=6)
    (step3,) = [k.rsplit("/", 1)[0] for k in manifests(s3) if "/step-000000003/" in k]
    other = ["--checkpoint.uri=s3://test-bucket/fork", f"--checkpoint.local_dir={tmp_path / 'fork'}",
             f"--checkpoint.resume=s3://test-bucket/{step3}", "--train.lr_schedule=constant"]
    resumed, proc = train(tmp_path, "fork", *other, steps=5)
    assert "resumed from checkpoint step 3" in proc.stdout + proc.stderr
    assert [m["step"] for m in resumed] == [4, 5]
    assert manifests(s3, "fork/")[-1].endswith("/step-000000005/manifest.json")  # the fork saves under its own URI


def test_a_stuck_upload_fails_the_job_at_its_own_deadline(tmp_path, s3_proxy):
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_steps=2", "--checkpoint.upload_timeout_s=4"]
    s3_proxy.faults, s3_proxy.fault_rate, s3_proxy.only_methods = ("stall",), 1.0, {"PUT"}
    proc, log = _start(tmp_path, "stuck-upload", *ck)
    try:
        started = time.monotonic()
        code = proc.wait(timeout=120)
        elapsed = time.monotonic() - started
    finally:
        kill_tree(proc)
        log.close()
    out = (tmp_path / "stuck-upload.log").read_text()
    assert code == 86, f"exit {code}, not 86 (README: a checkpoint upload past its deadline)\n{out[-3000:]}"
    assert s3_proxy.faults_injected["stall"] >= 1
    assert "did not finish within 4s (checkpoint.upload_timeout_s)" in out
    assert elapsed < 60, elapsed  # the upload deadline, not the collectives' or botocore's timeouts
    assert metrics(tmp_path / "stuck-upload.jsonl")[-1]["step"] < 1000  # it stopped training


def test_time_based_saves_are_agreed_by_every_rank(tmp_path, s3):
    # Rank 0's clock decides; the ranks agree through the store on a step a margin ahead (0.2 s of
    # steps, at least 2), so a save due after step N lands on the same later step on every rank.
    # At ~0.03 s a step the margin is ~7 steps: 24 steps leave room for a second save after the
    # first (12 did not once the save stopped blocking for 0.16 s: the second proposal had no step).
    ck = ["--checkpoint.uri=s3://test-bucket/ck", f"--checkpoint.local_dir={tmp_path / 'local'}",
          "--checkpoint.every_minutes=0.0005", "--checkpoint.keep=100", "--checkpoint.at_end=false"]
    run_metrics, proc = train(tmp_path, "timed", *ck, steps=24, timeout=120)
    assert [m["step"] for m in run_metrics] == list(range(1, 25))
    out = proc.stdout + proc.stderr
    assert len(manifests(s3)) >= 2, out
    agreed = [int(m) for m in re.findall(r"agreed: save after step (\d+) \(every_minutes\)", out)]
    assert len(agreed) == len(manifests(s3)), out
