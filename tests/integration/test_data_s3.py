"""Token shards on a real S3 server (moto over HTTP on 127.0.0.1), through a fault-injecting proxy.

Nothing is mocked: boto3 and s5cmd talk HTTP to moto; the proxy answers a share of the
requests 503 SlowDown / 500 or cuts response bodies short.
"""
import json
import math

import pytest

from llm_runtime.config import Config, ConfigError
from llm_runtime.data.build import build_loader, plan_data
from llm_runtime.data.prepare import PrepareError, prepare
from llm_runtime.storage import StorageError
from tests.datasets import sample_ids, write_dataset
from tests.procs import BIN, REPO, clean_env, metrics, run

SIZES = (37, 21, 50, 44, 28)  # 180 samples of 17 tokens


class Dims:
    def __init__(self, dp):
        self.dp_size = dp


@pytest.fixture
def dataset(tmp_path, s3):
    write_dataset(tmp_path / "local", SIZES)
    for path in sorted((tmp_path / "local").iterdir()):
        s3.client.upload_file(str(path), s3.bucket, f"tokens/{path.name}")
    return tmp_path / "local", s3.url("tokens")


def config(uri, **data):
    c = Config()
    c.train.seq_len, c.train.batch_size, c.train.seed = 16, 12, 3
    c.data.uri, c.data.shuffle_block, c.data.num_partitions, c.data.num_workers = str(uri), 16, 4, 0
    for key, value in data.items():
        setattr(c.data, key, value)
    return c


def read_all(cfg, dp=2, steps=17):
    """Ids per step for every replica, concatenated (replica order), and the summed stats."""
    per_rank, stats = [], {"requests": 0, "retries": 0, "bytes": 0}
    for rank in range(dp):
        with build_loader(cfg, Dims(dp), dp_rank=rank) as loader:
            per_rank.append([sample_ids(loader.next_batch()) for _ in range(steps)])
            for key in stats:
                stats[key] += loader.stats()[key]
    return [sum((per_rank[r][s] for r in range(dp)), []) for s in range(steps)], stats


def test_local_s3_streamed_and_staged_reads_give_the_same_samples(dataset, tmp_path):
    local, remote = dataset
    steps = 17  # past the end of the first epoch (15 steps)
    from_local, _ = read_all(config(local), steps=steps)
    streamed, stats = read_all(config(remote, num_workers=2), steps=steps)
    staged, _ = read_all(config(remote, mode="stage", stage_dir=str(tmp_path / "stage")), steps=steps)
    assert streamed == from_local and staged == from_local
    assert stats["retries"] == 0 and stats["bytes"] > 0
    # Each replica streams 2 partitions, one GET per shard a partition touches: a handful per epoch.
    assert stats["requests"] <= 2 * (len(SIZES) + 4) * 2


def test_a_loader_ending_at_the_last_step_gets_nothing_it_does_not_use(dataset, s3_proxy):
    # 15 steps make one epoch. Left open-ended, the loader prefetches the next epoch's first blocks
    # when it reaches the last ones; told the run's last step, it makes only the GETs it reads,
    # counted on the wire, with a DataLoader worker running ahead of the consumer.
    local, remote = dataset
    clean, _ = read_all(config(local), dp=1, steps=15)
    plan = plan_data(config(remote, num_workers=2), 1)

    def gets(last_step):
        s3_proxy.reset_counts()
        with build_loader(config(remote, num_workers=2), Dims(1), dp_rank=0, plan=plan, last_step=last_step) as loader:
            ids = [sample_ids(loader.next_batch()) for _ in range(15)]
            ended = None
            if last_step is not None:
                with pytest.raises(StopIteration, match="past its last step 14") as ended:
                    loader.next_batch()
        return ids, s3_proxy.methods.get("GET", 0), ended

    bounded, bounded_gets, ended = gets(14)
    open_ended, open_gets, _ = gets(None)
    assert bounded == open_ended == clean and ended is not None
    order = plan.order
    touched = {(seg.shard, p) for p in range(4) for seg in order.segments(0, p, 0, order.partition_len)}
    assert bounded_gets == len(touched)  # one streaming GET per (shard, partition) of the epoch
    assert open_gets > bounded_gets


def test_streaming_through_thirty_percent_faults_gives_identical_samples(dataset, s3_proxy):
    local, remote = dataset
    clean, _ = read_all(config(local))
    s3_proxy.faults = ("slowdown", "internal", "truncate")
    s3_proxy.fault_rate, s3_proxy.seed = 0.3, 7
    faulty, stats = read_all(config(remote, num_workers=2))
    assert faulty == clean
    assert sum(s3_proxy.faults_injected.values()) > 0 and stats["retries"] > 0
    assert s3_proxy.faults_injected["truncate"] > 0  # bodies cut short were resumed, not restarted


def test_staging_through_faults_gives_a_verified_copy(dataset, s3_proxy, tmp_path):
    local, remote = dataset
    clean, _ = read_all(config(local), steps=3)
    s3_proxy.faults, s3_proxy.fault_rate = ("slowdown", "internal", "truncate"), 0.3
    staged, _ = read_all(config(remote, mode="stage", stage_dir=str(tmp_path / "stage")), steps=3)
    assert staged == clean and sum(s3_proxy.faults_injected.values()) > 0


def test_an_object_that_keeps_failing_is_named_after_the_attempts_run_out(dataset, s3_proxy):
    _, remote = dataset
    cfg = config(remote, max_attempts=3)
    plan = plan_data(cfg, 1)  # the index read before the faults start
    s3_proxy.faults, s3_proxy.fault_rate, s3_proxy.only_methods = ("slowdown",), 1.0, {"GET"}
    with build_loader(cfg, Dims(1), dp_rank=0, plan=plan) as loader:
        with pytest.raises(StorageError, match=r"GET bytes .* of s3://test-bucket/tokens/shard-0000\d\d.tar "
                                               r"failed after 3 attempts: SlowDown"):
            loader.next_batch()


def test_a_missing_index_on_s3_is_reported_before_training(s3):
    with pytest.raises(ConfigError, match="s3://test-bucket/nothing/index.json does not exist"):
        plan_data(config(s3.url("nothing")), 1)


def test_prepare_data_reads_s3_inputs_and_writes_spread_s3_shards_identical_to_local(s3, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number in range(4):
        text = "".join(f"line {number}-{i}: the ferry crosses at dawn.\n" for i in range(150))
        (corpus / f"doc{number}.txt").write_text(text)
        s3.client.upload_file(str(corpus / f"doc{number}.txt"), s3.bucket, f"raw/doc{number}.txt")
    local = prepare([str(corpus)], str(tmp_path / "out"), seq_len=32, shard_size=20000, workers=2,
                    progress=False)
    remote = prepare([s3.url("raw")], s3.url("shards"), seq_len=32, shard_size=20000, workers=2,
                     prefixes=3, progress=False)
    assert (remote.samples, remote.shards) == (local.samples, local.shards) and local.shards >= 3
    index = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="shards/index.json")["Body"].read())
    names = [shard["name"] for shard in index["shards"]]
    assert {name.split("/")[0] for name in names} == {"p00", "p01", "p02"}
    for shard in index["shards"]:
        body = s3.client.get_object(Bucket=s3.bucket, Key=f"shards/{shard['name']}")["Body"].read()
        assert body == (tmp_path / "out" / shard["name"].split("/")[1]).read_bytes()


def test_hosts_prepare_their_share_and_host_zero_merges_the_index(s3, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number in range(5):
        (corpus / f"doc{number}.txt").write_text(f"document {number} " * 400)
    out = s3.url("multi")
    one = prepare([str(corpus)], out, seq_len=32, shard_size=10000, host_index=1, num_hosts=2, progress=False)
    zero = prepare([str(corpus)], out, seq_len=32, shard_size=10000, host_index=0, num_hosts=2,
                   merge_timeout_s=30, progress=False)
    index = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="multi/index.json")["Body"].read())
    names = [shard["name"] for shard in index["shards"]]
    assert len(names) == zero.shards + one.shards and names[0].startswith("shard-h000-")
    assert names[-1].startswith("shard-h001-") and index["total_samples"] == zero.samples + one.samples
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="multi/")["Contents"]
    assert not [o["Key"] for o in listed if "index.host-" in o["Key"]]  # partial indexes cleaned up
    # A rerun with other options never merges the earlier run's partial indexes, and drops the old index.
    prepare([str(corpus)], out, seq_len=32, shard_size=10000, host_index=1, num_hosts=2, progress=False)
    with pytest.raises(PrepareError, match=r"hosts \[1\]"):
        prepare([str(corpus)], out, seq_len=16, shard_size=10000, host_index=0, num_hosts=2, merge_timeout_s=1,
                progress=False)
    assert "multi/index.json" not in [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"]]
    with pytest.raises(PrepareError, match=r"waited 1s for the partial indexes of hosts \[1\]"):
        prepare([str(corpus)], s3.url("lonely"), seq_len=32, host_index=0, num_hosts=2, merge_timeout_s=1,
                progress=False)


@pytest.mark.slow
def test_train_streams_from_s3_through_faults_and_tp_peers_get_identical_batches(dataset, s3_proxy, tmp_path):
    _, remote = dataset
    s3_proxy.faults, s3_proxy.fault_rate = ("slowdown", "internal", "truncate"), 0.3
    env = clean_env(**s3_proxy.env(), LLM_RUNTIME_DATA_URI=remote, LLM_RUNTIME_TRAIN_SEQ_LEN="16",
                    LLM_RUNTIME_TRAIN_BATCH_SIZE="12", LLM_RUNTIME_PARALLEL_TP="2",
                    LLM_RUNTIME_DATA_NUM_PARTITIONS="4", LLM_RUNTIME_TRAIN_SEED="3",
                    LLM_RUNTIME_DATA_SHUFFLE_BLOCK="16", PYTHONPATH=str(REPO))
    out = tmp_path / "ranks"
    out.mkdir()
    run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "4", str(REPO / "tests/workers/data_ranks.py"),
         str(out), "4"], env=env, timeout=180)
    reports = sorted((json.loads(p.read_text()) for p in out.glob("rank-*.json")), key=lambda r: r["rank"])
    assert not [r["traceback"] for r in reports if "traceback" in r]
    by_dp = {}
    for report in reports:
        by_dp.setdefault(report["dp_rank"], []).append(report["batches"])
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 and v[0] == v[1] for v in by_dp.values())
    expected, _ = read_all(config(dataset[0]), steps=4)
    for step in range(4):
        assert sorted(by_dp[0][0][step] + by_dp[1][0][step]) == sorted(expected[step])
    assert sum(r["stats"]["retries"] for r in reports) > 0

    path = tmp_path / "metrics.jsonl"
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", "--model.dim=64", "--model.layers=2",
                "--train.steps=6", "--train.log_every=2", f"--metrics.jsonl={path}", "--data.num_workers=1"],
               env=env, timeout=180)
    curve = metrics(path)
    assert [m["step"] for m in curve] == [2, 4, 6] and all(math.isfinite(m["loss"]) for m in curve)
    assert "data: s3://test-bucket/tokens: 5 shards, 180 samples" in proc.stderr + proc.stdout
    assert "retries=" in proc.stdout + proc.stderr


def test_each_host_reads_the_index_once_and_its_workers_make_no_request_for_it(dataset, s3_proxy, tmp_path):
    # At 1,024 hosts x 8 ranks, a LIST and an index GET per rank would put one prefix over S3's
    # rate (benchmarks/s3_scale.py): the launcher's one GET of index.json is also its storage probe,
    # and it hands its workers the copy.
    _, remote = dataset
    env = clean_env(**s3_proxy.env(), LLM_RUNTIME_DATA_URI=remote, LLM_RUNTIME_TRAIN_SEQ_LEN="16",
                    LLM_RUNTIME_TRAIN_BATCH_SIZE="4", TMPDIR=str(tmp_path))
    s3_proxy.reset_counts()
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "2", "--model.dim=32", "--model.layers=1",
                "--train.steps=2", "--train.log_every=1", "--data.num_workers=0"], env=env, timeout=180)
    index_gets = [p for m, p in s3_proxy.paths if m == "GET" and p.split("?")[0].endswith("/tokens/index.json")]
    lists = [p for m, p in s3_proxy.paths if m == "GET" and "list-type=2" in p]
    assert len(index_gets) == 1 and len(lists) == 0, (s3_proxy.paths, proc.stderr)
    shard_gets = [p for m, p in s3_proxy.paths if m == "GET" and ".tar" in p]
    assert shard_gets, s3_proxy.paths  # the workers did read the data, only not the index
    assert list((tmp_path / "llm_runtime").glob("data-index-*.json")), "the host's copy is where workers look"


def test_a_stream_cut_again_and_again_completes_while_each_resume_makes_progress(dataset, s3_proxy):
    local, remote = dataset
    clean, _ = read_all(config(local, num_partitions=1), dp=1, steps=15)
    cfg = config(remote, max_attempts=2, num_partitions=1)  # one stream per shard, cut on most GETs
    plan = plan_data(cfg, 1)
    s3_proxy.faults, s3_proxy.fault_rate, s3_proxy.only_methods = ("truncate",), 0.8, {"GET"}
    with build_loader(cfg, Dims(1), dp_rank=0, plan=plan) as loader:
        ids = [sample_ids(loader.next_batch()) for _ in range(15)]
        stats = loader.stats()
    assert ids == clean
    assert s3_proxy.faults_injected["truncate"] > 2 * len(SIZES)  # more cuts than attempts per shard
    assert stats["retries"] >= s3_proxy.faults_injected["truncate"] - 1
