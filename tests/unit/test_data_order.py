"""The data order: partitions, blocks, steps and who reads what (pure tables, no I/O)."""
import itertools

import pytest

from llm_runtime.data.order import DataOrder, OrderError, Segment, auto_partitions

SIZES = (7, 3, 12, 5, 9, 4)  # 40 samples


def order(**kw):
    args = dict(shard_samples=SIZES, batch_size=8, num_partitions=4, shuffle_block=3, seed=11)
    args.update(kw)
    return DataOrder(**args)


@pytest.mark.parametrize("batch,parts,steps,plen,per_step", [
    (8, 4, 5, 10, 2),
    (8, 8, 5, 5, 1),
    (8, 1, 5, 40, 8),
    (12, 4, 3, 9, 3),   # 36 of 40 used: 4 dropped
    (16, 2, 2, 16, 8),
])
def test_epoch_uses_whole_global_batches_split_into_equal_partitions(batch, parts, steps, plen, per_step):
    o = order(batch_size=batch, num_partitions=parts)
    assert (o.steps_per_epoch, o.partition_len, o.per_step) == (steps, plen, per_step)


@pytest.mark.parametrize("kw,needle", [
    (dict(num_partitions=3), "data.num_partitions=3 must divide train.batch_size=8"),
    (dict(num_partitions=0), "data.num_partitions=0"),
    (dict(shuffle_block=0), "data.shuffle_block must be >= 1"),
    (dict(batch_size=64), "40 samples, fewer than one global batch"),
])
def test_orders_that_cannot_be_served_are_refused_with_the_key_to_change(kw, needle):
    with pytest.raises(OrderError, match=needle.replace("(", r"\(")):
        order(**kw)


@pytest.mark.parametrize("parts,dp,workers,streams,needle", [
    (4, 1, 0, 4, None), (4, 2, 0, 2, None), (4, 4, 1, 1, None), (8, 2, 2, 2, None), (8, 4, 2, 1, None),
    (4, 3, 0, 0, "not a multiple of the data-parallel size 3"),
    (4, 8, 0, 0, "not a multiple of the data-parallel size 8"),
    (8, 2, 3, 0, "data.num_workers=3 does not divide the 4 partitions"),
])
def test_data_parallel_and_worker_counts_must_divide_the_partitions(parts, dp, workers, streams, needle):
    o = order(batch_size=8, num_partitions=parts)
    if needle:
        with pytest.raises(OrderError, match=needle):
            o.check_layout(dp, workers)
    else:
        assert o.check_layout(dp, workers) == streams


@pytest.mark.parametrize("dp,workers,expected", [(1, 0, 1), (2, 1, 2), (4, 2, 8), (8, 4, 32)])
def test_default_partitions_give_every_worker_of_every_replica_one_stream(dp, workers, expected):
    assert auto_partitions(dp, workers) == expected


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_partitions_are_contiguous_runs_of_the_permuted_shards_and_never_overlap(epoch):
    o = order(batch_size=12, num_partitions=4)  # 36 of 40 used
    permuted = [(int(s), i) for s in o.epoch_shards(epoch) for i in range(SIZES[s])]
    covered = []
    for p in range(o.num_partitions):
        segments = o.segments(epoch, p, 0, o.partition_len)
        ids = [(seg.shard, seg.first + k) for seg in segments for k in range(seg.count)]
        assert ids == permuted[p * o.partition_len:(p + 1) * o.partition_len]
        assert len({seg.shard for seg in segments}) == len(segments)  # one read per shard
        covered += ids
    assert covered == permuted[:36]


def test_segments_of_a_sub_range_start_inside_a_shard():
    o = DataOrder(shard_samples=(5, 5), batch_size=2, num_partitions=1, shuffle_block=4, seed=0)
    first, second = (int(s) for s in o.epoch_shards(0))
    assert o.segments(0, 0, 3, 8) == [Segment(first, 3, 2), Segment(second, 0, 3)]


def test_shuffle_permutes_within_blocks_only_and_differs_per_epoch():
    o = order(batch_size=8, num_partitions=1, shuffle_block=8)  # partition = 40 samples, 5 blocks
    for epoch in (0, 1):
        local = [o.sample_id(epoch, 0, m) for m in range(o.partition_len)]
        straight = [(seg.shard, seg.first + k) for seg in o.segments(epoch, 0, 0, 40) for k in range(seg.count)]
        for block in range(5):
            assert sorted(local[block * 8:block * 8 + 8]) == sorted(straight[block * 8:block * 8 + 8])
        assert local != straight
    assert [o.sample_id(0, 0, m) for m in range(40)] != [o.sample_id(1, 0, m) for m in range(40)]


@pytest.mark.parametrize("batch,parts", [(8, 4), (8, 8), (12, 4), (4, 2)])
def test_every_used_sample_appears_exactly_once_per_epoch(batch, parts):
    o = order(batch_size=batch, num_partitions=parts)
    for epoch in (0, 1):
        seen = list(itertools.chain.from_iterable(
            o.global_ids(epoch * o.steps_per_epoch + s) for s in range(o.steps_per_epoch)))
        assert len(seen) == len(set(seen)) == o.steps_per_epoch * batch
        assert set(seen) <= {(s, i) for s, n in enumerate(SIZES) for i in range(n)}


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_replicas_split_each_global_batch_without_overlap_whatever_their_number(dp):
    o = order(batch_size=8, num_partitions=4)
    rows = [r for rank in range(dp) for r in o.replica_rows(rank, dp)]
    assert sorted(rows) == sorted((g % 4, g // 4) for g in range(8))
    for rank in range(dp):  # a replica's rows come only from its own partitions
        own = {p for w in range(1) for p in o.worker_partitions(rank, dp, w, 1)}
        assert {p for p, _ in o.replica_rows(rank, dp)} == own


def test_workers_of_a_replica_stream_disjoint_partitions():
    o = order(batch_size=8, num_partitions=8)
    parts = [o.worker_partitions(1, 2, w, 2) for w in range(2)]
    assert parts == [[1, 5], [3, 7]]
    assert sorted(parts[0] + parts[1]) == [1, 3, 5, 7]


def test_step_positions_continue_across_epochs():
    o = order(batch_size=8, num_partitions=4)
    assert [o.locate(s) for s in (0, 4, 5, 11)] == [(0, 0), (0, 4), (1, 0), (2, 1)]
