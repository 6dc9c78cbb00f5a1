"""Parallel layouts before any process group: ParallelDims, resolve_dims, dims_for, train.check_job() and the config keys.

Pure arithmetic only: no process, no process group. The rank <-> coordinate oracle below is
written independently of the library (nested loops in mesh order [pp, dp_replicate, dp_shard, tp]).
"""
from __future__ import annotations

import itertools
import logging
import re

import pytest

from llm_runtime.cluster import ClusterInfo
from llm_runtime.config import Config, ConfigError, ParallelConfig, load_config, parse_cli_overrides
from llm_runtime.parallel.dims import AXES, ParallelDims, resolve_dims
from llm_runtime.parallel.dims import dims_for
from llm_runtime.train import check_job


def check(config, world, **options):
    """(model config, dims) of train.check_job."""
    return check_job(config, world, **options)[:2]

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "tp")


def dims(pp=1, dp_replicate=1, dp_shard=1, tp=1) -> ParallelDims:
    return ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, pp=pp)


def mesh_order_ranks(d: ParallelDims):
    """(rank, coords) in mesh order with tp fastest: the independent oracle."""
    sizes = [d.pp, d.dp_replicate, d.dp_shard, d.tp]
    for rank, index in enumerate(itertools.product(*(range(s) for s in sizes))):
        yield rank, dict(zip(MESH_ORDER, index))


def config_with(overrides: dict) -> Config:
    return load_config(cli=[(key, str(value)) for key, value in overrides.items()])


# Layouts (pp, dp_replicate, dp_shard, tp) used by the rank tables.
LAYOUTS = [
    (1, 1, 1, 1),
    (1, 1, 8, 1),
    (1, 2, 4, 1),
    (1, 1, 4, 2),
    (2, 1, 2, 2),
    (2, 2, 2, 2),
    (3, 2, 1, 2),
    (2, 3, 2, 1),
    (4, 1, 1, 2),
]
LAYOUT_IDS = [f"pp{p}-rep{r}-shard{s}-tp{t}" for p, r, s, t in LAYOUTS]


# ------------------------------------------------------------------ ParallelDims: ranks and coordinates

def test_spec_example_rank_5_of_pp2_shard2_tp2_is_pp1_shard0_tp1():
    d = dims(pp=2, dp_replicate=1, dp_shard=2, tp=2)
    assert d.coords(5) == {"pp": 1, "dp_replicate": 0, "dp_shard": 0, "tp": 1}


@pytest.mark.parametrize("pp, dp_replicate, dp_shard, tp", LAYOUTS, ids=LAYOUT_IDS)
def test_rank_coordinates_follow_mesh_order_pp_replicate_shard_tp_with_tp_fastest(pp, dp_replicate, dp_shard, tp):
    d = dims(pp, dp_replicate, dp_shard, tp)
    for rank, expected in mesh_order_ranks(d):
        assert d.coords(rank) == expected, f"rank {rank}"
        assert list(d.coords(rank)) == list(MESH_ORDER)


@pytest.mark.parametrize("pp, dp_replicate, dp_shard, tp", LAYOUTS, ids=LAYOUT_IDS)
def test_tensor_parallel_peers_are_consecutive_ranks(pp, dp_replicate, dp_shard, tp):
    d = dims(pp, dp_replicate, dp_shard, tp)
    for first in range(0, d.world_size, tp):
        peers = [d.coords(r) for r in range(first, first + tp)]
        assert [c["tp"] for c in peers] == list(range(tp))
        assert len({(c["pp"], c["dp_replicate"], c["dp_shard"]) for c in peers}) == 1


@pytest.mark.parametrize("rank_of", [lambda world: -1, lambda world: world, lambda world: world + 3],
                         ids=["negative", "world-size", "beyond"])
def test_rank_outside_the_world_has_no_coordinates(rank_of):
    d = dims(pp=2, dp_shard=2, tp=2)
    with pytest.raises(ValueError, match="outside a world of 8"):
        d.coords(rank_of(d.world_size))


@pytest.mark.parametrize("pp, dp_replicate, dp_shard, tp", LAYOUTS, ids=LAYOUT_IDS)
def test_tensor_and_pipeline_peers_of_one_replica_read_the_same_batch_slice(pp, dp_replicate, dp_shard, tp):
    d = dims(pp, dp_replicate, dp_shard, tp)
    by_replica: dict[tuple[int, int], set[int]] = {}
    for rank, c in mesh_order_ranks(d):
        by_replica.setdefault((c["dp_replicate"], c["dp_shard"]), set()).add(d.dp_rank(rank))
    assert len(by_replica) == d.dp_size
    assert all(len(slices) == 1 for slices in by_replica.values()), by_replica


@pytest.mark.parametrize("pp, dp_replicate, dp_shard, tp", LAYOUTS, ids=LAYOUT_IDS)
def test_every_batch_slice_is_read_exactly_once_per_pipeline_and_tensor_coordinate(pp, dp_replicate, dp_shard, tp):
    d = dims(pp, dp_replicate, dp_shard, tp)
    by_pp_tp: dict[tuple[int, int], list[int]] = {}
    for rank, c in mesh_order_ranks(d):
        by_pp_tp.setdefault((c["pp"], c["tp"]), []).append(d.dp_rank(rank))
    assert len(by_pp_tp) == pp * tp
    for key, slices in by_pp_tp.items():
        assert sorted(slices) == list(range(d.dp_size)), key


@pytest.mark.parametrize("pp, dp_replicate, dp_shard, tp", LAYOUTS, ids=LAYOUT_IDS)
def test_world_size_is_the_product_and_dp_size_is_replicas_times_shards(pp, dp_replicate, dp_shard, tp):
    d = dims(pp, dp_replicate, dp_shard, tp)
    assert d.world_size == pp * dp_replicate * dp_shard * tp
    assert d.dp_size == dp_replicate * dp_shard
    assert d.sizes() == {"pp": pp, "dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": tp}
    assert AXES == MESH_ORDER


@pytest.mark.parametrize("layout, expected", [
    ((1, 1, 1, 1), []),
    ((1, 1, 8, 1), [("dp_shard", 8)]),
    ((1, 2, 4, 1), [("dp_replicate", 2), ("dp_shard", 4)]),
    ((2, 1, 2, 2), [("pp", 2), ("dp_shard", 2), ("tp", 2)]),
    ((2, 2, 2, 2), [("pp", 2), ("dp_replicate", 2), ("dp_shard", 2), ("tp", 2)]),
    ((4, 1, 1, 2), [("pp", 4), ("tp", 2)]),
    ((1, 3, 1, 1), [("dp_replicate", 3)]),
], ids=["world-of-one", "fsdp-only", "hsdp", "3d", "4d", "pp-tp", "replicate-only"])
def test_mesh_lists_only_axes_larger_than_one_in_mesh_order(layout, expected):
    assert dims(*layout).mesh_axes() == expected


def test_layout_description_reads_in_mesh_order():
    assert dims(pp=2, dp_shard=2, tp=2).describe() == "pp=2 x dp_replicate=1 x dp_shard=2 x tp=2"


@pytest.mark.parametrize("axis, value", [
    ("dp_replicate", 0), ("dp_shard", -1), ("tp", 0), ("pp", 0), ("dp_shard", 0),
])
def test_unresolved_or_zero_size_in_parallel_dims_is_refused_naming_the_axis(axis, value):
    sizes = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1, axis: value}
    with pytest.raises(ValueError, match=rf"parallel\.{axis}"):
        ParallelDims(**sizes)


# ------------------------------------------------------------------ resolve_dims: inference

RESOLVE_CASES = [
    # (id, resolve_dims kwargs, expected (dp_replicate, dp_shard, tp, pp))
    ("world-of-one", dict(world_size=1), (1, 1, 1, 1)),
    ("one-node-shards-over-every-rank", dict(world_size=8), (1, 8, 1, 1)),
    ("one-node-with-nproc-still-one-group", dict(world_size=8, nproc_per_node=8, num_nodes=1), (1, 8, 1, 1)),
    ("tp-takes-its-share-first", dict(world_size=8, tp=2), (1, 4, 2, 1)),
    ("3d-layout", dict(world_size=8, tp=2, pp=2), (1, 2, 2, 2)),
    ("replicas-given-shards-follow", dict(world_size=8, dp_replicate=2), (2, 4, 1, 1)),
    ("shards-given-replicas-follow", dict(world_size=8, dp_shard=2), (4, 2, 1, 1)),
    ("both-given", dict(world_size=8, dp_replicate=2, dp_shard=4), (2, 4, 1, 1)),
    ("shard-group-size-sets-dp-shard", dict(world_size=8, shard_group_size=4), (2, 4, 1, 1)),
    ("shard-group-size-agreeing-with-dp-shard", dict(world_size=8, shard_group_size=4, dp_shard=4), (2, 4, 1, 1)),
    ("shard-group-size-with-replicas", dict(world_size=8, shard_group_size=2, dp_replicate=4), (4, 2, 1, 1)),
    ("shard-group-size-with-tp", dict(world_size=16, shard_group_size=2, tp=2), (4, 2, 2, 1)),
    ("two-nodes-one-group-per-node", dict(world_size=16, nproc_per_node=8, num_nodes=2), (2, 8, 1, 1)),
    ("two-nodes-tp2-group-is-node-dp-ranks", dict(world_size=16, nproc_per_node=8, num_nodes=2, tp=2), (2, 4, 2, 1)),
    ("four-nodes-tp4", dict(world_size=32, nproc_per_node=8, num_nodes=4, tp=4), (4, 2, 4, 1)),
    ("four-nodes-pp2", dict(world_size=16, nproc_per_node=4, num_nodes=4, pp=2), (2, 4, 1, 2)),
    ("two-nodes-user-replicas-win", dict(world_size=16, nproc_per_node=8, num_nodes=2, dp_replicate=1), (1, 16, 1, 1)),
    ("two-nodes-user-shard-group-wins",
     dict(world_size=16, nproc_per_node=8, num_nodes=2, shard_group_size=16), (1, 16, 1, 1)),
    ("two-nodes-user-dp-shard-wins", dict(world_size=16, nproc_per_node=8, num_nodes=2, dp_shard=2), (8, 2, 1, 1)),
]


@pytest.mark.parametrize("kwargs, expected", [c[1:] for c in RESOLVE_CASES], ids=[c[0] for c in RESOLVE_CASES])
def test_inferred_layout_fills_in_replicas_and_shards(kwargs, expected):
    resolved = resolve_dims(**kwargs)
    assert (resolved.dp_replicate, resolved.dp_shard, resolved.tp, resolved.pp) == expected
    assert resolved.world_size == kwargs["world_size"]


@pytest.mark.parametrize("nodes, nproc, tp", [(2, 8, 1), (2, 8, 2), (4, 8, 4), (3, 4, 2), (8, 8, 8)])
def test_default_multi_node_shard_group_never_leaves_a_node(nodes, nproc, tp):
    world = nodes * nproc
    resolved = resolve_dims(world_size=world, tp=tp, nproc_per_node=nproc, num_nodes=nodes)
    assert resolved.dp_shard == nproc // tp
    for rank, c in mesh_order_ranks(resolved):
        # ranks that share (pp, dp_replicate) form one shard group x tp; it must sit on one node
        group_nodes = {r // nproc for r, other in mesh_order_ranks(resolved)
                       if (other["pp"], other["dp_replicate"]) == (c["pp"], c["dp_replicate"])}
        assert group_nodes == {rank // nproc}


# ------------------------------------------------------------------ resolve_dims: errors

MISMATCH_CASES = [
    # (id, kwargs)
    ("world-not-divisible-by-tp", dict(world_size=6, tp=4)),
    ("world-not-divisible-by-tp-times-pp", dict(world_size=12, tp=2, pp=4)),
    ("replicas-do-not-divide", dict(world_size=8, dp_replicate=3)),
    ("shards-do-not-divide", dict(world_size=8, dp_shard=3)),
    ("explicit-product-too-small", dict(world_size=8, dp_replicate=2, dp_shard=2)),
    ("explicit-product-too-large", dict(world_size=8, dp_replicate=2, dp_shard=2, tp=2, pp=2)),
    ("shard-group-size-does-not-divide", dict(world_size=8, shard_group_size=3)),
    ("shard-group-size-times-replicas-mismatch", dict(world_size=8, shard_group_size=2, dp_replicate=3)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in MISMATCH_CASES], ids=[c[0] for c in MISMATCH_CASES])
def test_layout_that_does_not_fit_the_world_names_every_factor_and_world_size(kwargs):
    with pytest.raises(ValueError) as info:
        resolve_dims(**kwargs)
    message = str(info.value)
    for axis in AXES:
        assert f"parallel.{axis}=" in message, message
    assert f"parallel.tp={kwargs.get('tp', 1)}" in message
    assert f"parallel.pp={kwargs.get('pp', 1)}" in message
    assert "WORLD_SIZE" in message
    assert re.search(rf"\b{kwargs['world_size']}\b", message), message


def test_dims_for_turns_a_layout_mismatch_into_a_config_error_naming_every_factor():
    info = ClusterInfo(kind="local", hosts=("h",), current_host="h", node_rank=0, num_nodes=1, nproc_per_node=8,
                       master_addr="127.0.0.1", master_port=29500)
    with pytest.raises(ConfigError) as err:
        dims_for(ParallelConfig(dp_replicate=3, dp_shard=3), 8, nproc_per_node=info.nproc_per_node)
    for axis in AXES:
        assert f"parallel.{axis}=" in str(err.value)
    assert "WORLD_SIZE" in str(err.value)


def test_dims_for_uses_the_cluster_node_layout_for_one_shard_group_per_node():
    info = ClusterInfo(kind="torchrun", hosts=("a", "b"), current_host="a", node_rank=0, num_nodes=2,
                       nproc_per_node=4, master_addr="a", master_port=29500)
    assert dims_for(ParallelConfig(tp=2), 8, nproc_per_node=info.nproc_per_node,
                    num_nodes=info.num_nodes) == ParallelDims(dp_replicate=2, dp_shard=2, tp=2, pp=1)


@pytest.mark.parametrize("shard_group_size, dp_shard", [(4, 2), (2, 8), (8, 1)])
def test_shard_group_size_contradicting_dp_shard_is_an_error_naming_both_keys(shard_group_size, dp_shard):
    with pytest.raises(ValueError) as info:
        resolve_dims(world_size=8, shard_group_size=shard_group_size, dp_shard=dp_shard)
    message = str(info.value)
    assert f"parallel.shard_group_size={shard_group_size}" in message
    assert f"parallel.dp_shard={dp_shard}" in message


@pytest.mark.parametrize("kwargs, needle", [
    (dict(world_size=0), "WORLD_SIZE"),
    (dict(world_size=8, tp=0), "parallel.tp"),
    (dict(world_size=8, pp=-1), "parallel.pp"),
    (dict(world_size=8, dp_shard=0), "dp_shard"),
    (dict(world_size=8, dp_shard=-2), "dp_shard"),
    (dict(world_size=8, dp_replicate=-2), "dp_replicate"),
    (dict(world_size=8, shard_group_size=-1), "shard_group_size"),
], ids=["world-zero", "tp-zero", "pp-negative", "dp-shard-zero", "dp-shard-minus-two", "dp-replicate-negative",
        "shard-group-size-negative"])
def test_nonsense_size_is_refused_naming_the_key(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        resolve_dims(**kwargs)


# ------------------------------------------------------------------ resolve_dims: the cross-node tp warning

@pytest.fixture
def dims_log(caplog, monkeypatch):
    """caplog for llm_runtime.parallel.dims, even after runtime.init() turned off propagation in this process."""
    for name in ("llm_runtime", "llm_runtime.parallel", "llm_runtime.parallel.dims"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="llm_runtime.parallel.dims"):
        yield caplog


@pytest.mark.parametrize("world, nproc, nodes, tp", [(16, 8, 2, 16), (8, 2, 4, 4), (4, 1, 4, 2)])
def test_tp_larger_than_a_node_warns_that_traffic_crosses_nodes(dims_log, world, nproc, nodes, tp):
    resolve_dims(world_size=world, tp=tp, nproc_per_node=nproc, num_nodes=nodes)
    warnings = [r for r in dims_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"parallel.tp={tp}" in warnings[0].getMessage()
    assert str(nproc) in warnings[0].getMessage()


@pytest.mark.parametrize("world, nproc, nodes, tp", [(16, 8, 2, 8), (16, 8, 2, 2), (8, None, 1, 8)])
def test_tp_within_a_node_does_not_warn(dims_log, world, nproc, nodes, tp):
    resolve_dims(world_size=world, tp=tp, nproc_per_node=nproc, num_nodes=nodes)
    assert [r for r in dims_log.records if r.levelno >= logging.WARNING] == []


# ------------------------------------------------------------------ train.check_job: layout errors before any worker

def test_tp_that_does_not_divide_the_heads_is_a_config_error_naming_tp_and_heads():
    with pytest.raises(ConfigError) as info:
        check(config_with({"model.heads": 4, "parallel.tp": 3}), 3)
    assert "parallel.tp=3" in str(info.value)
    assert "heads" in str(info.value)
    assert "4" in str(info.value)


def test_layout_product_mismatch_is_a_config_error_naming_every_factor():
    config = config_with({"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "parallel.tp": 2, "parallel.pp": 1})
    with pytest.raises(ConfigError) as info:
        check(config, 6)
    message = str(info.value)
    for axis in AXES:
        assert f"parallel.{axis}=" in message
    assert "WORLD_SIZE" in message and "6" in message


@pytest.mark.parametrize("overrides, world, expected", [
    ({"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.tp": 2}, 8, (1, 2, 2, 2)),
    ({"parallel.pp": 2, "parallel.tp": 2}, 8, (1, 2, 2, 2)),
    ({"parallel.shard_group_size": 2}, 8, (4, 2, 1, 1)),
    ({}, 1, (1, 1, 1, 1)),
], ids=["3d-explicit", "3d-inferred-shards", "hsdp", "world-of-one"])
def test_valid_layout_passes_check_and_returns_the_resolved_dims(overrides, world, expected):
    model_config, resolved = check(config_with(overrides), world)
    assert (resolved.dp_replicate, resolved.dp_shard, resolved.tp, resolved.pp) == expected
    assert resolved.dp_size == expected[0] * expected[1]
    assert model_config.layers == Config().model.layers


def test_spec_3d_layout_world_8_has_two_data_parallel_replicas():
    _, resolved = check(config_with({"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.tp": 2}), 8)
    assert resolved.dp_size == 2


def test_check_warns_about_cross_node_tp_but_accepts_the_layout(dims_log):
    _, resolved = check(config_with({"parallel.tp": 4}), 4, nproc_per_node=2, num_nodes=2)
    assert resolved.tp == 4
    assert any("parallel.tp=4" in r.getMessage() for r in dims_log.records)


# ------------------------------------------------------------------ config keys of the parallel section

@pytest.mark.parametrize("key, value", [
    ("parallel.pp_schedule", "bogus"),
    ("parallel.mixed_precision", "fp8"),
    ("parallel.activation_checkpoint", "some"),
])
def test_unknown_choice_on_the_command_line_is_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(cli=parse_cli_overrides([f"--{key}={value}"]))
    assert key in str(info.value)
    assert value in str(info.value)


@pytest.mark.parametrize("variable, value, attribute, expected", [
    ("LLM_RUNTIME_PARALLEL_TP", "2", "tp", 2),
    ("LLM_RUNTIME_PARALLEL_PP", "4", "pp", 4),
    ("LLM_RUNTIME_PARALLEL_DP_SHARD", "8", "dp_shard", 8),
    ("LLM_RUNTIME_PARALLEL_SHARD_GROUP_SIZE", "4", "shard_group_size", 4),
    ("LLM_RUNTIME_PARALLEL_PP_SCHEDULE", "interleaved", "pp_schedule", "interleaved"),
    ("LLM_RUNTIME_PARALLEL_PP_SPLIT_POINTS", "3,6", "pp_split_points", "3,6"),
])
def test_environment_variable_sets_the_parallel_key(variable, value, attribute, expected):
    config = load_config(env={variable: value})
    assert getattr(config.parallel, attribute) == expected


def test_non_integer_tp_from_the_environment_is_rejected_naming_the_variable():
    with pytest.raises(ConfigError, match="LLM_RUNTIME_PARALLEL_TP"):
        load_config(env={"LLM_RUNTIME_PARALLEL_TP": "two"})


def test_parallel_defaults_mean_infer_everything():
    parallel = Config().parallel
    assert (parallel.dp_replicate, parallel.dp_shard, parallel.tp, parallel.pp) == (0, -1, 1, 1)
    assert parallel.shard_group_size == 0


@pytest.mark.parametrize("dp_replicate", [-1, 0])
def test_minus_one_or_zero_dp_replicate_is_inferred(dp_replicate):
    dims = resolve_dims(world_size=8, dp_replicate=dp_replicate, dp_shard=2)
    assert (dims.dp_replicate, dims.dp_shard) == (4, 2)


def test_a_layout_that_does_not_fit_the_world_names_who_set_its_keys():
    config = load_config(env={"LLM_RUNTIME_PARALLEL_TP": "3"}, cli=[("train.batch_size", "8")])
    with pytest.raises(ConfigError) as err:
        check(config, 4)
    message = str(err.value)
    assert "WORLD_SIZE=4" in message
    assert "set by parallel.tp=3 (from environment variable LLM_RUNTIME_PARALLEL_TP)" in message
    assert "train.batch_size=8 (from command line --train.batch_size)" in message
