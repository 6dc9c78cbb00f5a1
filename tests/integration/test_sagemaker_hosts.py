"""Two simulated SageMaker hosts on one machine (tests/hosts.py: own hostname, own /opt/ml, own
loopback address). Every byte stays on 127.0.0.0/8.

Real: unshare, the llm-runtime launcher, torch.distributed.run, gloo, Open MPI's mpirun.
Nothing of the launcher is mocked; only ssh is replaced (Open MPI's plm_rsh_agent) by nsenter.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests.hosts import HOSTS, Cluster, namespaces_work
from tests.procs import BIN, REPO, STRAGGLERS, metrics, read_rank_reports

pytestmark = pytest.mark.slow

WORKER = str(REPO / "tests" / "workers" / "report.py")
TINY = {"model.dim": 64, "model.layers": 2, "model.heads": 4, "train.seq_len": 64, "train.batch_size": 8,
        "train.log_every": 1, "train.warmup_steps": 1}

RSH_AGENT = """#!/bin/sh
# Open MPI calls: AGENT HOST COMMAND...; run COMMAND inside that simulated host's namespaces.
# Like ssh, the remote side starts from a bare environment: only what mpirun exports (-x)
# reaches the remote ranks, so the test can see whether the plan's variables were exported.
host=$1; shift
pid=$(grep "^$host " "{pidmap}" | cut -d' ' -f2)
[ -n "$pid" ] || {{ echo "rsh agent: unknown host $host" >&2; exit 1; }}
exec nsenter -t "$pid" -u -m -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root /bin/sh -c "$*"
"""


@pytest.fixture(scope="module")
def namespaces():
    reason = namespaces_work()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def cluster_factory(tmp_path, namespaces):
    made: list[Cluster] = []

    def make(hyperparameters: dict, **kwargs) -> Cluster:
        made.append(Cluster(tmp_path, hyperparameters, **kwargs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.stop()


def test_docker_train_argument_runs_the_jobs_program_on_four_ranks_placed_by_host(cluster_factory, tmp_path):
    # `docker run IMAGE train` with ENTRYPOINT ["llm-runtime", "launch"]: the job's program comes
    # from the sagemaker_program hyperparameter, found in /opt/ml/code, other hyperparameters as --key value.
    out = tmp_path / "reports"
    out.mkdir()
    cluster = cluster_factory({"sagemaker_program": "report.py", "out": str(out)})
    for host in HOSTS:
        shutil.copy(WORKER, tmp_path / host / "code" / "report.py")
        cluster.start(host, str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", "train")
    codes = cluster.wait_all(timeout=180)
    assert codes == {"algo-1": 0, "algo-2": 0}, cluster.logs()
    reports = read_rank_reports(out, 4)
    assert [r["hostname"] for r in reports] == ["algo-1", "algo-1", "algo-2", "algo-2"]
    assert {r["kind"] for r in reports} == {"sagemaker"}
    assert {tuple(r["hosts"]) for r in reports} == {HOSTS}
    assert [r["sum"] for r in reports] == [10.0] * 4
    assert reports[0]["argv"] == ["--out", str(out)]
    assert {r["env"]["NCCL_SOCKET_IFNAME"] for r in reports} == {"lo"}  # from resourceconfig, via the plan


def test_docker_train_argument_without_a_program_runs_the_builtin_trainer_across_two_hosts(cluster_factory, tmp_path):
    # `docker run IMAGE train` with ENTRYPOINT ["llm-runtime", "launch"] and no sagemaker_program.
    cluster = cluster_factory({**TINY, "train.steps": 3, "metrics.jsonl": "/opt/ml/output/metrics.jsonl"})
    for host in HOSTS:
        cluster.start(host, str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", "train")
    codes = cluster.wait_all(timeout=180)
    assert codes == {"algo-1": 0, "algo-2": 0}, cluster.logs()
    steps = metrics(tmp_path / "algo-1" / "output" / "metrics.jsonl")  # rank 0 lives on algo-1
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert "rank 0/4 on algo-1" in cluster.output("algo-1")
    assert not (tmp_path / "algo-2" / "output" / "metrics.jsonl").exists()


def test_killing_one_hosts_workers_fails_both_hosts_within_60s(cluster_factory, tmp_path):
    # Default timeouts: the survivors learn of the loss from their gloo connections, not a timer.
    cluster = cluster_factory({**TINY, "train.steps": 100000, "metrics.jsonl": "/opt/ml/output/metrics.jsonl"})
    for host in HOSTS:
        cluster.start(host, str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", "train")
    progress = tmp_path / "algo-1" / "output" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (progress.exists() and progress.read_text().strip()):
        assert time.monotonic() < deadline, "training never started\n" + cluster.logs()
        assert all(p.poll() is None for p in cluster.procs.values()), "a host exited early\n" + cluster.logs()
        time.sleep(0.5)
    launcher = cluster.procs["algo-2"].pid
    workers = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    assert len(workers) >= 2, f"expected algo-2's 2 workers under pid {launcher}, found {workers}"
    killed_at = time.monotonic()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    codes = cluster.wait_all(timeout=60)
    assert codes["algo-1"] != 0 and codes["algo-2"] != 0, cluster.logs()
    assert time.monotonic() - killed_at < 60


def test_a_rank_hung_in_a_collective_on_the_second_host_stops_both_hosts_with_code_86(cluster_factory, tmp_path):
    # Rank 2 (algo-2) hangs before its forward; ranks 0, 1 and 3 wait for it inside FSDP's all-gather.
    cluster = cluster_factory({**TINY, "train.steps": 400, "watchdog.step_timeout_s": 6, "watchdog.exchange_s": 3})
    for host in HOSTS:
        cluster.start(host, str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", "train",
                      LLM_RUNTIME_FAULT="hang:rank=2,step=3")
    deadline = time.monotonic() + 180
    while "LLM_RUNTIME_FAULT: hang on rank 2" not in cluster.output("algo-2"):
        assert time.monotonic() < deadline, "the fault never fired\n" + cluster.logs()
        assert all(p.poll() is None for p in cluster.procs.values()), "a host exited early\n" + cluster.logs()
        time.sleep(0.2)
    codes = cluster.wait_all(timeout=6 + 30)  # the step timeout plus 30 s
    assert codes == {"algo-1": 86, "algo-2": 86}, cluster.logs()
    for host in HOSTS:  # each host's /opt/ml/output/failure (SageMaker's failure reason) blames rank 2
        failure = (tmp_path / host / "output" / "failure").read_text()
        assert "host=algo-2 rank=2 step=3 phase=step" in failure and "suspect_ranks=2" in failure, failure
    waiting = json.loads((tmp_path / "algo-1" / "output" / "failures" / "rank-00000.json").read_text())
    assert waiting["in_collective"] and waiting["suspects"] == [2]


# A step long enough (tens of ms of compute per rank) that 3x clears the default floor
# (watchdog.straggler_min_s=0.05); the judgement uses the default factor and floor.
STRAGGLER_JOB = {**TINY, "model.dim": 256, "model.layers": 4, "model.heads": 8, "train.seq_len": 128,
                 "train.steps": 20, "watchdog.straggler_every": 5, "metrics.jsonl": "/opt/ml/output/metrics.jsonl"}


@pytest.mark.stragglers_expected
def test_a_rank_slowed_3x_in_compute_is_named_alone_with_its_host_within_20_steps(cluster_factory, tmp_path):
    # Rank 1 (algo-1) computes 3x as long; the others wait for it inside FSDP's collectives, so every
    # rank's step time is the same: only the ranks' own compute times, traded through the store, tell.
    cluster = cluster_factory(STRAGGLER_JOB)
    before = STRAGGLERS.stat().st_size if STRAGGLERS.exists() else 0  # the file is shared by the session
    for host in HOSTS:
        cluster.start(host, str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", "train",
                      LLM_RUNTIME_FAULT="slow:rank=1,factor=3,phase=step")
    codes = cluster.wait_all(timeout=240)
    assert codes == {"algo-1": 0, "algo-2": 0}, cluster.logs()
    rows = metrics(tmp_path / "algo-1" / "output" / "metrics.jsonl")
    named = [(r["step"], r["straggler"], r["slow_s"]) for r in rows if r.get("straggler")]
    assert named and {name for _, name, _ in named} == {"algo-1:rank1"}, rows
    assert named[0][0] <= 20 and all(slow >= 0.05 for _, _, slow in named), named
    assert "straggler=algo-1:rank1 slow_s=" in cluster.output("algo-1")  # the metrics line
    assert "straggler: algo-1:rank1 is slower than the other ranks" in cluster.output("algo-1")  # the warning
    with open(STRAGGLERS) as records:
        records.seek(before)
        recorded = [json.loads(line) for line in records.read().splitlines()]
    assert recorded and {(r["host"], r["rank"]) for r in recorded} == {("algo-1", 1)}, recorded


def test_a_clean_four_rank_run_with_stragglers_fail_names_nobody_and_finishes(cluster_factory, tmp_path):
    # The same job without the drill, where any false alarm would end it with exit 87.
    cluster = cluster_factory({**STRAGGLER_JOB, "watchdog.stragglers": "fail"})
    for host in HOSTS:
        cluster.start(host, str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", "train")
    codes = cluster.wait_all(timeout=240)
    assert codes == {"algo-1": 0, "algo-2": 0}, cluster.logs()
    rows = metrics(tmp_path / "algo-1" / "output" / "metrics.jsonl")
    assert [r["step"] for r in rows][-1] == 20 and not any(r.get("straggler") for r in rows)
    assert "straggler=" not in cluster.logs() and "straggler: " not in cluster.logs()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed")
def test_mpi_launch_from_first_host_reaches_remote_ranks_with_the_env_plan(cluster_factory, tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    cluster = cluster_factory({})
    agent = tmp_path / "rsh-agent"
    agent.write_text(RSH_AGENT.format(pidmap=tmp_path / "pids"))
    agent.chmod(0o755)
    command = (str(BIN / "llm-runtime"), "launch", "--mpi", "--nproc-per-node", "2", WORKER, str(out))
    # The agent replaces ssh, so neither host starts sshd or waits for port 22.
    second = cluster.start("algo-2", *command, OMPI_MCA_plm_rsh_agent=str(agent))  # waits for algo-1's status
    (tmp_path / "pids").write_text(f"algo-2 {second.pid}\n")
    cluster.start("algo-1", *command, OMPI_MCA_plm_rsh_agent=str(agent))
    codes = cluster.wait_all(timeout=180)
    assert codes == {"algo-1": 0, "algo-2": 0}, cluster.logs()
    reports = read_rank_reports(out, 4)
    assert {r["kind"] for r in reports} == {"mpi"}
    assert [r["hostname"] for r in reports] == ["algo-1", "algo-1", "algo-2", "algo-2"]
    assert [r["sum"] for r in reports] == [10.0] * 4
    remote = [r for r in reports if r["hostname"] == "algo-2"]
    assert {r["env"]["NCCL_SOCKET_IFNAME"] for r in remote} == {"lo"}  # exported with -x by mpirun
    assert {r["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] for r in remote} == {"1"}
    assert {r["env"]["MASTER_ADDR"] for r in reports} == {"algo-1"}


def test_two_hosts_upload_one_object_each_per_checkpoint_plus_a_report_and_the_manifest(cluster_factory, tmp_path,
                                                                                       s3_proxy, s3):
    # Hierarchical checkpointing: 4 ranks on 2 hosts write 2 x nodes = 4 objects per checkpoint (a tar
    # per node, host 2's report to host 1, the manifest), never one per rank.
    cluster = cluster_factory({**TINY, "train.steps": 4, "checkpoint.uri": "s3://test-bucket/ck",
                               "checkpoint.local_dir": str(tmp_path / "local"), "checkpoint.every_steps": 2,
                               "checkpoint.keep": 5, "metrics.jsonl": "/opt/ml/output/metrics.jsonl"})
    for host in HOSTS:
        cluster.start(host, str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", "train")
    codes = cluster.wait_all(timeout=240)
    assert codes == {"algo-1": 0, "algo-2": 0}, cluster.logs()
    keys = sorted(o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="ck/")["Contents"])
    for step in (2, 4):
        mine = [k for k in keys if f"/step-{step:09d}/" in k]
        assert len(mine) == 2 * 2, mine  # 2 x nodes
        assert sorted(re.sub(r"-[0-9a-f]{8}\.", ".", k.split("/", 2)[2]) for k in mine) == \
            ["s00/step-%09d/node-00000.tar" % step, "s01/step-%09d/node-00001.tar" % step,
             "step-%09d/manifest.json" % step, "step-%09d/nodes/node-00001.json" % step]  # the spread prefix first
        manifest = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=[k for k in mine
                                                                           if k.endswith("manifest.json")][0])["Body"].read())
        assert manifest["world_size"] == 4 and manifest["num_nodes"] == 2
        members = {m["name"] for o in manifest["objects"] for m in o["members"]}
        assert {f"rank-{r:05d}.json" for r in range(4)} <= members and "dcp/.metadata" in members
        ranks_by_node = {o["node"]: sorted(m["name"] for m in o["members"] if m["name"].startswith("rank-"))
                         for o in manifest["objects"]}
        assert ranks_by_node == {0: ["rank-00000.json", "rank-00001.json"], 1: ["rank-00002.json", "rank-00003.json"]}
    # Each object is small (< one part): one PUT per object, 4 per checkpoint, nothing per rank; the
    # peer replicas add only their small records (each node's server, and which steps its peer holds).
    puts = [path for method, path in s3_proxy.paths if method == "PUT"]
    assert len([p for p in puts if "/replicas/" not in p]) == 2 * 4, puts
    assert {p.split("/replicas/")[1].split("?")[0] for p in puts if "/replicas/" in p} == {
        "servers/node-00000.json", "servers/node-00001.json", "node-00000.json", "node-00001.json"}
    assert "checkpoint step=4 blocked_s=" in cluster.output("algo-1")


def _tar_gets(proxy, node: int) -> int:
    """Ranged GETs of node ``node``'s checkpoint tars, counted at the proxy."""
    return sum(1 for method, path in proxy.paths if method == "GET" and f"/node-{node:05d}" in path
               and ".tar" in path.split("?")[0])


def test_a_replaced_host_restores_from_its_peers_replica_with_no_s3_reads_of_checkpoint_data(cluster_factory, tmp_path,
                                                                                         s3_proxy, s3):
    # Each host has a disk of its own (LLM_RUNTIME_CHECKPOINT_LOCAL_DIR). algo-2 (node 1) is "replaced"
    # between attempts: its disk is wiped. Its files come back from algo-1, which holds its replica.
    cluster = cluster_factory({**TINY, "train.steps": 6, "checkpoint.uri": "s3://test-bucket/ck",
                               "checkpoint.every_steps": 2, "checkpoint.keep": 5,
                               "metrics.jsonl": "/opt/ml/output/metrics.jsonl"})
    disks = {host: tmp_path / f"disk-{host}" for host in HOSTS}

    def attempt(**env: str) -> list[dict]:
        for host in HOSTS:
            cluster.start(host, str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", "train",
                          LLM_RUNTIME_CHECKPOINT_LOCAL_DIR=str(disks[host]), **env)
        codes = cluster.wait_all(timeout=240)
        assert codes == {"algo-1": 0, "algo-2": 0}, cluster.logs()
        return metrics(tmp_path / "algo-1" / "output" / "metrics.jsonl")

    def forget_step_6() -> None:  # step 6's manifest goes: the next attempt resumes from step 4
        keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="ck/")["Contents"]]
        (manifest,) = [k for k in keys if k.endswith("step-000000006/manifest.json")]
        s3.client.delete_object(Bucket=s3.bucket, Key=manifest)
        for host in HOSTS:
            (tmp_path / host / "output" / "metrics.jsonl").unlink(missing_ok=True)

    full = attempt()
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    (held,) = list(disks["algo-1"].glob("*/replicas/node-00001"))
    assert sorted(p.name for p in held.iterdir()) == ["step-000000002", "step-000000004", "step-000000006"]
    assert list(held.glob("step-000000004/dcp/__2_0.distcp"))

    forget_step_6()
    (marker,) = [run / "marker" for run in disks["algo-2"].iterdir()]
    marker.write_text("gone once the drill wipes the run's directory")
    s3_proxy.reset_counts()
    resumed = attempt(LLM_RUNTIME_FAULT="wipe:rank=1,phase=launch")  # the drill: algo-2 (node 1) gets a fresh disk
    assert "resumed from checkpoint step 4" in cluster.output("algo-1"), cluster.logs()
    assert "LLM_RUNTIME_FAULT: wipe: removing node 1's local checkpoints" in cluster.output("algo-2")
    assert not marker.exists() and "removing node" not in cluster.output("algo-1")  # node 0 keeps its disk
    gets = "\n".join(p for m, p in s3_proxy.paths if m == "GET")
    # No checkpoint data from S3 at all: node 1's files came from algo-1's replica, node 0's (the
    # .metadata and the tensors DCP keeps once, which node 1's ranks read too) from algo-1's own disk.
    assert _tar_gets(s3_proxy, 0) == 0 and _tar_gets(s3_proxy, 1) == 0, gets
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in full[4:]]

    # The replica is gone too (both copies of node 1's files): those come from S3, still exact.
    forget_step_6()
    shutil.rmtree(disks["algo-2"])
    shutil.rmtree(held)
    s3_proxy.reset_counts()
    fallback = attempt()
    assert _tar_gets(s3_proxy, 1) > 0
    assert [(r["step"], r["loss"]) for r in fallback] == [(r["step"], r["loss"]) for r in full[4:]]
