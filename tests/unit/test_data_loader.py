"""The shard loader on local files: exact order, resume, resizing, workers, damaged shards."""
import io
import itertools
import os

import pytest

from llm_runtime.config import Config, ConfigError
from llm_runtime.paths import job_paths
from llm_runtime.data.build import build_loader, plan_data
from llm_runtime.data.order import DataOrder
from llm_runtime.data.stage import StageError
from tests.datasets import global_id, sample_ids, write_dataset

SIZES = (9, 4, 13, 6, 8)  # 40 samples: 5 global batches of 8


class Dims:
    def __init__(self, dp):
        self.dp_size = dp


@pytest.fixture
def shards(tmp_path):
    write_dataset(tmp_path / "shards", SIZES)
    return tmp_path / "shards"


def config(uri, **data):
    c = Config()
    c.train.seq_len, c.train.batch_size, c.train.seed = 16, 8, 5
    c.data.uri, c.data.shuffle_block, c.data.num_partitions = str(uri), 3, 4
    for key, value in data.items():
        setattr(c.data, key, value)
    return c


def reference(steps, **kw):
    args = dict(shard_samples=SIZES, batch_size=8, num_partitions=4, shuffle_block=3, seed=5)
    args.update(kw)
    o = DataOrder(**args)
    return [[global_id(SIZES, s, i) for s, i in o.global_ids(step)] for step in range(steps)]


def read(cfg, dp, rank, steps, state=None):
    with build_loader(cfg, Dims(dp), dp_rank=rank, state=state) as loader:
        batches = [loader.next_batch() for _ in range(steps)]
        return batches, loader.state_dict(), loader.stats()


@pytest.mark.parametrize("dp,workers", [(1, 0), (2, 0), (2, 2), (4, 1)])
def test_replicas_read_exactly_their_rows_of_the_defined_global_batch(shards, dp, workers):
    steps = 12  # two epochs and a bit
    expected = reference(steps)
    per_rank = [read(config(shards, num_workers=workers), dp, rank, steps)[0] for rank in range(dp)]
    for step in range(steps):
        for rank in range(dp):
            assert sample_ids(per_rank[rank][step]) == expected[step][rank::dp], (step, rank)
    batch = per_rank[0][0]
    assert batch.dtype.is_floating_point is False and tuple(batch.shape) == (8 // dp, 17)


def test_a_resumed_loader_yields_exactly_what_an_uninterrupted_one_would(shards):
    cfg = config(shards, num_workers=2)
    straight, _, _ = read(cfg, 2, 1, 9)
    first, state, _ = read(cfg, 2, 1, 3)
    rest, _, _ = read(cfg, 2, 1, 6, state=state)
    assert [sample_ids(b) for b in first + rest] == [sample_ids(b) for b in straight]
    assert state["step"] == 3 and state["num_partitions"] == 4


def test_resizing_from_four_replicas_to_two_covers_the_epoch_exactly_once(shards):
    cfg = config(shards, num_partitions=0, num_workers=0)  # auto: 4 partitions from dp 4 x 1 worker
    seen, states = [], []
    for rank in range(4):
        batches, state, _ = read(cfg, 4, rank, 2)
        seen += [i for b in batches for i in sample_ids(b)]
        states.append(state)
    assert all(s == states[0] for s in states) and states[0]["num_partitions"] == 4
    for rank in range(2):  # dp 2 would default to 2 partitions: the saved 4 are kept
        batches, _, _ = read(cfg, 2, rank, 3, state=states[0])
        seen += [i for b in batches for i in sample_ids(b)]
    assert sorted(seen) == list(range(40))


def test_a_saved_position_from_other_data_is_refused(shards, tmp_path):
    _, state, _ = read(config(shards), 1, 0, 1)
    write_dataset(tmp_path / "other", (20, 20))
    with pytest.raises(ValueError, match="fingerprint"):
        read(config(tmp_path / "other"), 1, 0, 1, state=state)


def test_each_shard_is_opened_once_per_partition_pass(shards):
    _, _, stats = read(config(shards, num_partitions=1, num_workers=0, shuffle_block=2), 1, 0, 5)
    assert stats["requests"] == len(SIZES)  # one sequential read per shard for the whole epoch


@pytest.mark.parametrize("damage,needle", [
    (lambda data: data[:len(data) // 2 + 100], "truncated at byte offset"),
    (lambda data: data[:2048 + 257] + b"XXXXX" + data[2048 + 262:], "corrupt at byte offset 2048"),
])
def test_a_damaged_shard_is_named_with_the_byte_offset(shards, damage, needle):
    path = shards / "shard-000002.tar"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises((ValueError, OSError), match=f"shard-000002.tar.*{needle}"):
        read(config(shards, num_partitions=1, num_workers=0), 1, 0, 5)


def test_staged_copies_are_verified_against_the_index(shards, tmp_path):
    good, _, _ = read(config(shards, mode="stage", stage_dir=str(tmp_path / "stage")), 1, 0, 3)
    assert [sample_ids(b) for b in good] == reference(3)
    (shards / "shard-000001.tar").write_bytes(b"\0" * 100)  # the source changed under the index
    with pytest.raises(StageError, match="shard-000001.tar .* does not match index.json"):
        read(config(shards, mode="stage", stage_dir=str(tmp_path / "stage2")), 1, 0, 1)


def test_the_reused_staged_copy_is_the_verified_one(shards, tmp_path):
    cfg = config(shards, mode="stage", stage_dir=str(tmp_path / "stage"))
    read(cfg, 1, 0, 1)
    (shards / "shard-000001.tar").unlink()  # a second run on the host reads the verified copy
    batches, _, _ = read(cfg, 1, 0, 2)
    assert [sample_ids(b) for b in batches] == reference(2)


@pytest.mark.parametrize("change,needle", [
    (dict(seq_len=32), "holds sequences of 16 tokens .* train.seq_len=32"),
    (dict(batch_size=64), "fewer than one global batch"),
    (dict(num_partitions=3), "data.num_partitions=3 must divide train.batch_size=8"),
    (dict(max_open_shards=1, num_partitions=8), "would stream 8 partitions at once but data.max_open_shards=1"),
    (dict(uri="/no/such/dir"), "/no/such/dir/index.json does not exist"),
    (dict(uri="s3://Bad_Bucket/x"), "not a valid S3 bucket name"),
    (dict(uri="gs://bucket/x"), "only local paths, s3:// and channel:NAME"),
    # Ranges (data.timeout_s=0, ...) are the config's own check: tests/unit/test_config.py.
])
def test_data_that_does_not_fit_the_job_fails_before_training_with_the_key_named(shards, change, needle):
    cfg = config(shards, num_workers=1)
    for key, value in change.items():
        setattr(cfg.train if key in ("seq_len", "batch_size") else cfg.data, key, value)
    with pytest.raises(ConfigError, match=needle):
        plan_data(cfg, 1, job_paths(cfg, "", {}))


def test_index_names_that_escape_the_data_directory_are_refused(shards):
    index = (shards / "index.json").read_text().replace('"shard-000000.tar"', '"../../etc/passwd"')
    (shards / "index.json").write_text(index)
    with pytest.raises(ConfigError, match="'../../etc/passwd' is not a plain relative path"):
        plan_data(config(shards), 1, job_paths(Config(), "", {}))


def test_no_data_at_all_trains_on_the_bundled_text(tmp_path):
    cfg = Config()
    plan = plan_data(cfg, 2, job_paths(cfg, "", {"SAGEMAKER_BASE_DIR": str(tmp_path)}))
    assert plan.location.kind == "bundled"
    with build_loader(cfg, Dims(2), dp_rank=1, paths=job_paths(cfg, "", {"SAGEMAKER_BASE_DIR": str(tmp_path)})) as loader:
        rows = [loader.next_batch() for _ in range(2)]
        state = loader.state_dict()
    assert tuple(rows[0].shape) == (8, 129) and state["step"] == 2
    with build_loader(cfg, Dims(2), dp_rank=1, paths=job_paths(cfg, "", {"SAGEMAKER_BASE_DIR": str(tmp_path)}), state=state) as loader:
        assert loader.step == 2


def test_workers_leave_no_processes_or_threads_behind(shards):
    import threading

    before = threading.active_count()
    for _ in itertools.repeat(None, 2):
        read(config(shards, num_workers=2), 2, 0, 2)
        read(config(shards, num_workers=0), 2, 0, 2)
    assert threading.active_count() <= before


class _ObservedShardFile(io.FileIO):
    """A shard file whose reads are recorded as the file system receives them: offset, size asked
    for, bytes returned. The loader's own buffered reader sits on top, unchanged."""

    def __init__(self, path, record):
        super().__init__(path, "rb")
        self._record = record
        record("open", os.path.basename(path))

    def readinto(self, buffer):
        at = self.tell()
        got = super().readinto(buffer)
        self._record("read", os.path.basename(self.name), at, len(buffer), got)
        return got

    def close(self):
        if not self.closed:
            self._record("close", os.path.basename(self.name))
        super().close()


def observe_shard_reads(patch, shards, log_path):
    """Every open, read and close of a file in ``shards``, by any process (DataLoader workers are
    forked, so they inherit the hook), appended to ``log_path`` as [pid, event, ...] lines."""
    import builtins
    import json

    real_open = builtins.open

    def record(*event):
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (json.dumps([os.getpid(), *event]) + "\n").encode())
        finally:
            os.close(fd)

    def observing_open(file, mode="r", buffering=-1, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.dirname(os.path.abspath(file)) == str(shards) \
                and str(file).endswith(".tar"):
            assert mode == "rb" and not args and not kwargs, (file, mode, args, kwargs)
            size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
            return io.BufferedReader(_ObservedShardFile(os.fspath(file), record), buffer_size=size)
        return real_open(file, mode, buffering, *args, **kwargs)

    patch.setattr(builtins, "open", observing_open)

    def events():
        with real_open(log_path) as handle:
            return [json.loads(line) for line in handle]
    return events


def read_channel(shards, tmp_path, mode, steps):
    """``steps`` batches from a SageMaker train channel in ``mode``, 2 DataLoader workers, one
    partition each (the default data.num_partitions), and what the file system saw."""
    import json

    root = tmp_path / f"ml-{mode}"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "inputdataconfig.json").write_text(
        json.dumps({"train": {"TrainingInputMode": mode}}))
    cfg = config("", num_workers=2, num_partitions=0)  # no data.uri: the train channel
    with pytest.MonkeyPatch.context() as patch:
        events = observe_shard_reads(patch, shards, tmp_path / f"reads-{mode}.jsonl")
        with build_loader(cfg, Dims(1), dp_rank=0, paths=job_paths(cfg, "", {"SM_CHANNEL_TRAIN": str(shards),
                                                                          "SAGEMAKER_BASE_DIR": str(root)})) as loader:
            batches = [sample_ids(loader.next_batch()) for _ in range(steps)]
    return batches, events()


def test_a_fastfile_channel_is_read_with_one_sequential_stream_per_worker(shards, tmp_path):
    # FastFile is S3 behind a file system: fast for files read front to back in large reads,
    # slow for random reads and many files at once.
    batches, events = read_channel(shards, tmp_path, "FastFile", steps=5)  # one epoch (workers read ahead)
    assert batches == reference(5, num_partitions=2)
    workers = {event[0] for event in events}
    assert len(workers) == 2 and os.getpid() not in workers  # the two DataLoader workers read, nobody else
    for worker in workers:
        open_now, read_up_to = set(), {}
        for _, kind, name, *read in (e for e in events if e[0] == worker):
            if kind == "open":
                assert not open_now, f"worker {worker} opened {name} while {sorted(open_now)} was open"
                open_now.add(name)
                read_up_to[name] = None
            elif kind == "close":
                open_now.remove(name)
            else:
                at, asked, got = read
                assert name in open_now, f"{name} read while not open"
                # Sequential: each read continues where the previous one ended (no seek back, no skip).
                assert read_up_to[name] in (None, at), f"{name}: read at {at} after reading up to {read_up_to[name]}"
                read_up_to[name] = at + got
                assert asked == 8 << 20, f"{name}: a read of {asked} bytes, not 8 MiB"
    assert {name for _, kind, name, *_ in events if kind == "read"} == {f"shard-{n:06d}.tar" for n in range(5)}
    # A File channel is a local disk: the same order, in the default 1 MiB reads.
    file_batches, file_events = read_channel(shards, tmp_path, "File", steps=5)
    assert file_batches == batches
    assert {event[4] for event in file_events if event[1] == "read"} == {1 << 20}


def test_other_local_ranks_wait_for_local_rank_zero_to_stage(shards, tmp_path):
    import threading

    cfg = config(shards, mode="stage", stage_dir=str(tmp_path / "stage"))
    results = {}

    def local_rank_one():
        results["one"], _, _ = read_one(cfg)

    def read_one(c):
        with build_loader(c, Dims(1), dp_rank=0, local_rank=1) as loader:
            return [sample_ids(loader.next_batch())], None, None

    waiter = threading.Thread(target=local_rank_one, daemon=True)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # nothing staged yet: local rank 1 waits
    zero, _, _ = read(cfg, 1, 0, 1)
    waiter.join(30)
    assert not waiter.is_alive() and results["one"] == [sample_ids(zero[0])]


def test_a_local_rank_gives_up_waiting_for_staging_with_a_clear_error(shards, tmp_path):
    cfg = config(shards, mode="stage", stage_dir=str(tmp_path / "stage"), stage_timeout_s=0.5)
    with pytest.raises(StageError, match="local rank 1 waited 1s .*data.stage_timeout_s.* for local rank 0"):
        build_loader(cfg, Dims(1), dp_rank=0, local_rank=1)


def test_a_failure_of_local_rank_zero_in_this_launch_stops_the_waiting_ranks_at_once(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    (shards / "shard-000003.tar").write_bytes(b"not what the index says")
    cfg = config(shards, mode="stage", stage_dir=str(tmp_path / "stage"), stage_timeout_s=60)
    with pytest.raises(StageError, match="does not match index.json"):
        build_loader(cfg, Dims(1), dp_rank=0, local_rank=0)
    with pytest.raises(StageError, match="local rank 0 failed to stage .*shard-000003.tar"):
        build_loader(cfg, Dims(1), dp_rank=0, local_rank=1)  # the marker is from this launch: no 60 s wait
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted launch ignores the old failure
    cfg.data.stage_timeout_s = 0.3
    with pytest.raises(StageError, match="waited 0.6s"):
        build_loader(cfg, Dims(1), dp_rank=0, local_rank=1)


@pytest.mark.parametrize("edit,needle", [
    (lambda body: body.replace('"uint16"', '"float32"'), "token dtype 'float32' is not one this format writes"),
    (lambda body: body.replace('"samples": 9', '"samples": 900'), "shard-000000.tar with 900 samples in"),
])
def test_an_index_that_cannot_describe_its_shards_fails_before_training(shards, edit, needle):
    (shards / "index.json").write_text(edit((shards / "index.json").read_text()))
    with pytest.raises(ConfigError, match=needle):
        plan_data(config(shards), 1, job_paths(Config(), "", {}))
