"""The DeepSpeed backend's config as tables (llm_runtime.parallel.deepspeed_config, train.check_job).

Pure: no processes, no process groups, and DeepSpeed itself is never imported; where
``train.check_job`` asks whether DeepSpeed is installed, ``importlib.util.find_spec`` is faked.
"""
from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
from dataclasses import replace

import pytest

from llm_runtime import train as train_mod
from llm_runtime.config import Config, ConfigError, ParallelConfig, TrainConfig, load_config, parse_cli_overrides
from llm_runtime.parallel.deepspeed_config import (DeepSpeedLayout, deepspeed_config, deepspeed_layout,
                                                   merge_user_config)

_REAL_FIND_SPEC = importlib.util.find_spec


def parallel(**kw) -> ParallelConfig:
    return replace(ParallelConfig(backend="deepspeed"), **kw)


def layout(dp=4, pp=1, zero_stage=3, shard_group_size=0, shard_mode="hpz") -> DeepSpeedLayout:
    return DeepSpeedLayout(dp=dp, pp=pp, zero_stage=zero_stage, shard_group_size=shard_group_size,
                           shard_mode=shard_mode)


def config(train=None, **parallel_kw) -> Config:
    return Config(train=train or TrainConfig(), parallel=parallel(**parallel_kw))


def ds(cfg=None, lay=None, *, micro=4, accumulation=1, device_type="cuda", mics_available=False) -> dict:
    return deepspeed_config(cfg or config(), lay or layout(), micro_batch=micro, accumulation=accumulation,
                            device_type=device_type, mics_available=mics_available)


# ------------------------------------------------------------------ deepspeed_layout

LAYOUT_OK = [
    # (id, parallel keys, world, (dp, pp, stage, shard_group_size))
    ("zero-0", dict(zero_stage=0), 4, (4, 1, 0, 0)),
    ("zero-1", dict(zero_stage=1), 4, (4, 1, 1, 0)),
    ("zero-2", dict(zero_stage=2), 4, (4, 1, 2, 0)),
    ("zero-3", dict(zero_stage=3), 4, (4, 1, 3, 0)),
    ("default-stage-is-3-without-pipeline", dict(), 4, (4, 1, 3, 0)),
    ("default-stage-is-1-with-pipeline", dict(pp=2), 4, (2, 2, 1, 0)),
    ("pipeline-with-zero-0", dict(pp=2, zero_stage=0), 4, (2, 2, 0, 0)),
    ("pipeline-with-zero-1", dict(pp=4, zero_stage=1), 8, (2, 4, 1, 0)),
    ("whole-world-one-pipeline", dict(pp=4), 4, (1, 4, 1, 0)),
    ("single-process", dict(), 1, (1, 1, 3, 0)),
    ("hpz-groups-of-2-over-4", dict(shard_group_size=2), 4, (4, 1, 3, 2)),
    ("shard-group-equal-to-dp", dict(zero_stage=3, shard_group_size=8), 8, (8, 1, 3, 8)),
    ("dp-replicate-minus-one-means-infer", dict(dp_replicate=-1), 4, (4, 1, 3, 0)),
]


@pytest.mark.parametrize("keys, world, expected", [c[1:] for c in LAYOUT_OK], ids=[c[0] for c in LAYOUT_OK])
def test_layout_accepts_supported_deepspeed_layouts(keys, world, expected):
    out = deepspeed_layout(parallel(**keys), world)
    assert (out.dp, out.pp, out.zero_stage, out.shard_group_size) == expected


@pytest.mark.parametrize("mode", ["hpz", "mics"])
def test_layout_carries_the_shard_mode(mode):
    assert deepspeed_layout(parallel(shard_group_size=2, zero_shard_mode=mode), 4).shard_mode == mode


LAYOUT_BAD = [
    # (id, parallel keys, world, fragments every one of which the message must contain)
    ("pipeline-with-zero-2", dict(pp=2, zero_stage=2), 4, ["zero_stage=2", "pp=2", "pipeline", "0 or 1"]),
    ("pipeline-with-zero-3", dict(pp=2, zero_stage=3), 4, ["zero_stage=3", "pp=2", "pipeline", "0 or 1"]),
    ("tensor-parallel", dict(tp=2), 4, ["parallel.tp=2", "fsdp"]),
    ("explicit-dp-shard", dict(dp_shard=2), 4, ["dp_shard", "shard_group_size"]),
    ("explicit-dp-replicate", dict(dp_replicate=2), 4, ["dp_replicate", "shard_group_size"]),
    ("explicit-dp-replicate-1", dict(dp_replicate=1), 4, ["dp_replicate", "shard_group_size"]),
    ("shard-group-with-zero-2", dict(zero_stage=2, shard_group_size=2), 4,
     ["shard_group_size=2", "zero_stage=3"]),
    ("shard-group-with-zero-1", dict(zero_stage=1, shard_group_size=2), 4,
     ["shard_group_size=2", "zero_stage=3"]),
    ("shard-group-with-pipeline-default-stage", dict(pp=2, shard_group_size=2), 8,
     ["shard_group_size=2", "zero_stage=3"]),
    ("shard-group-not-dividing-dp", dict(shard_group_size=3), 4, ["shard_group_size=3", "4"]),
    ("shard-group-larger-than-dp", dict(shard_group_size=8), 4, ["shard_group_size=8", "4"]),
    ("shard-group-not-dividing-dp-after-pipeline", dict(pp=2, zero_stage=0, shard_group_size=4), 8,
     ["shard_group_size=4"]),
    ("pp-not-dividing-world", dict(pp=3), 4, ["parallel.pp=3", "4"]),
    ("pp-larger-than-world", dict(pp=8), 4, ["parallel.pp=8", "4"]),
    ("pp-zero", dict(pp=0), 4, ["parallel.pp=0"]),
    ("zero-stage-4", dict(zero_stage=4), 4, ["zero_stage", "4"]),
]


@pytest.mark.parametrize("keys, world, fragments", [c[1:] for c in LAYOUT_BAD], ids=[c[0] for c in LAYOUT_BAD])
def test_layout_rejects_unsupported_combination_naming_the_key(keys, world, fragments):
    with pytest.raises(ValueError) as err:
        deepspeed_layout(parallel(**keys), world)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_layout_rejects_zero_stage_below_minus_one():
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_layout(parallel(zero_stage=-2), 4)


def test_layout_rejects_negative_shard_group_size():
    with pytest.raises(ValueError, match="shard_group_size"):
        deepspeed_layout(parallel(shard_group_size=-1), 4)


# ------------------------------------------------------------------ deepspeed_config

@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_config_puts_the_zero_stage_in_zero_optimization(stage):
    out = ds(lay=layout(zero_stage=stage))
    assert out["zero_optimization"] == {"stage": stage}


BATCH_OK = [
    # (id, batch_size, dp, micro, accumulation)
    ("one-micro-batch-per-rank", 16, 4, 4, 1),
    ("accumulation-4", 16, 4, 1, 4),
    ("accumulation-2", 16, 2, 4, 2),
    ("single-rank-whole-batch", 8, 1, 8, 1),
    ("single-rank-accumulate", 8, 1, 2, 4),
    ("odd-batch", 12, 3, 2, 2),
]


@pytest.mark.parametrize("batch, dp, micro, accumulation", [c[1:] for c in BATCH_OK], ids=[c[0] for c in BATCH_OK])
def test_config_global_batch_is_micro_times_accumulation_times_dp(batch, dp, micro, accumulation):
    out = ds(config(train=TrainConfig(batch_size=batch)), layout(dp=dp), micro=micro, accumulation=accumulation)
    assert out["train_batch_size"] == batch
    assert out["train_micro_batch_size_per_gpu"] == micro
    assert out["gradient_accumulation_steps"] == accumulation
    assert (out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"] * dp
            == out["train_batch_size"])


BATCH_BAD = [
    ("micro-too-small", 16, 4, 2, 1),
    ("accumulation-too-large", 16, 4, 4, 2),
    ("dp-ignored", 16, 2, 4, 1),
    ("batch-not-a-product", 10, 4, 2, 1),
]


@pytest.mark.parametrize("batch, dp, micro, accumulation", [c[1:] for c in BATCH_BAD], ids=[c[0] for c in BATCH_BAD])
def test_config_rejects_micro_batch_arithmetic_that_misses_the_global_batch(batch, dp, micro, accumulation):
    with pytest.raises(ValueError) as err:
        ds(config(train=TrainConfig(batch_size=batch)), layout(dp=dp), micro=micro, accumulation=accumulation)
    assert f"train.batch_size={batch}" in str(err.value)


@pytest.mark.parametrize("batch, micro_batch_size, world, pp", [
    (16, 0, 4, 1), (16, 2, 4, 1), (16, 1, 4, 2), (32, 4, 8, 2), (6, 0, 4, 2), (8, 0, 1, 1),
])
def test_config_accepts_what_the_trainers_batch_layout_computes(batch, micro_batch_size, world, pp):
    train = TrainConfig(batch_size=batch, micro_batch_size=micro_batch_size)
    lay = deepspeed_layout(parallel(pp=pp), world)
    micro, accumulation = train_mod.batch_layout(train, lay.dp)
    out = ds(config(train=train, pp=pp), lay, micro=micro, accumulation=accumulation)
    assert out["train_batch_size"] == batch


SHARD_CASES = [
    # (id, mode, mics_available, expected zero_optimization)
    ("hpz", "hpz", False, {"stage": 3, "zero_hpz_partition_size": 2}),
    ("hpz-even-when-mics-exists", "hpz", True, {"stage": 3, "zero_hpz_partition_size": 2}),
    ("mics-on-a-deepspeed-with-mics", "mics", True, {"stage": 3, "mics_shard_size": 2}),
]


@pytest.mark.parametrize("mode, mics, expected", [c[1:] for c in SHARD_CASES], ids=[c[0] for c in SHARD_CASES])
def test_config_shard_group_size_becomes_hpz_or_mics_key(mode, mics, expected):
    out = ds(lay=layout(shard_group_size=2, shard_mode=mode), mics_available=mics)
    assert out["zero_optimization"] == expected


def test_config_mics_on_a_deepspeed_without_mics_is_an_error_pointing_at_hpz():
    with pytest.raises(ValueError) as err:
        ds(lay=layout(shard_group_size=2, shard_mode="mics"), mics_available=False)
    assert "zero_shard_mode=mics" in str(err.value)
    assert "hpz" in str(err.value)


@pytest.mark.parametrize("mode", ["hpz", "mics"])
def test_config_without_shard_group_has_neither_hpz_nor_mics_key(mode):
    out = ds(lay=layout(shard_group_size=0, shard_mode=mode), mics_available=True)
    assert out["zero_optimization"] == {"stage": 3}


PRECISION_CASES = [
    # (id, device, mixed_precision, reduce_dtype, bf16 enabled, communication_data_type or None)
    ("cuda-bf16-fp32-reduce", "cuda", "bf16", "fp32", True, "fp32"),
    ("cuda-bf16-bf16-reduce", "cuda", "bf16", "bf16", True, None),
    ("cuda-fp32", "cuda", "fp32", "fp32", False, None),
    ("cuda-fp32-bf16-reduce", "cuda", "fp32", "bf16", False, None),
    ("cpu-bf16-requested-runs-fp32", "cpu", "bf16", "fp32", False, None),
    ("cpu-bf16-bf16-reduce", "cpu", "bf16", "bf16", False, None),
    ("cpu-fp32", "cpu", "fp32", "fp32", False, None),
]


@pytest.mark.parametrize("device, mixed, reduce, bf16, comm", [c[1:] for c in PRECISION_CASES],
                         ids=[c[0] for c in PRECISION_CASES])
def test_config_bf16_only_on_cuda_and_fp32_communication_with_fp32_reduce(device, mixed, reduce, bf16, comm):
    out = ds(config(mixed_precision=mixed, reduce_dtype=reduce), device_type=device)
    assert out["bf16"] == {"enabled": bf16}
    assert out.get("communication_data_type") == comm


def test_config_never_turns_on_fp16():
    out = ds(config(mixed_precision="bf16"), device_type="cuda")
    assert not out.get("fp16", {}).get("enabled", False)


@pytest.mark.parametrize("grad_clip", [0.0, 0.5, 1.0, 3.25])
def test_config_gradient_clipping_is_train_grad_clip(grad_clip):
    assert ds(config(train=TrainConfig(grad_clip=grad_clip)))["gradient_clipping"] == grad_clip


@pytest.mark.parametrize("lr, weight_decay", [(3e-3, 0.1), (1e-4, 0.0), (0.5, 0.25)])
def test_config_optimizer_is_torch_adamw_with_lr_and_weight_decay_from_train(lr, weight_decay):
    opt = ds(config(train=TrainConfig(lr=lr, weight_decay=weight_decay)))["optimizer"]
    assert opt["type"] == "AdamW"
    assert opt["params"]["torch_adam"] is True
    assert opt["params"]["lr"] == lr
    assert opt["params"]["weight_decay"] == weight_decay


def test_config_is_json_serialisable():
    out = ds(config(shard_group_size=2), layout(shard_group_size=2))
    assert json.loads(json.dumps(out)) == out


# ------------------------------------------------------------------ merge_user_config

OURS = {
    "train_batch_size": 16,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2},
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "weight_decay": 0.1, "torch_adam": True}},
}

MERGE_CASES = [
    # (id, user, paths -> expected merged value, expected conflicts as (dotted key, user value, our value))
    ("empty-user-config", {}, {"zero_optimization.stage": 3, "train_batch_size": 16}, []),
    ("nested-new-key-keeps-our-stage", {"zero_optimization": {"overlap_comm": True}},
     {"zero_optimization.stage": 3, "zero_optimization.overlap_comm": True,
      "zero_optimization.zero_hpz_partition_size": 2}, []),
    ("top-level-override", {"gradient_clipping": 0.5}, {"gradient_clipping": 0.5}, [("gradient_clipping", 0.5, 1.0)]),
    ("nested-override", {"zero_optimization": {"stage": 2}}, {"zero_optimization.stage": 2,
                                                             "zero_optimization.zero_hpz_partition_size": 2},
     [("zero_optimization.stage", 2, 3)]),
    ("deep-override", {"optimizer": {"params": {"lr": 0.1}}},
     {"optimizer.params.lr": 0.1, "optimizer.params.weight_decay": 0.1, "optimizer.params.torch_adam": True,
      "optimizer.type": "AdamW"}, [("optimizer.params.lr", 0.1, 0.003)]),
    ("equal-values-are-not-conflicts", {"train_batch_size": 16, "bf16": {"enabled": True},
                                        "optimizer": {"type": "AdamW"}},
     {"train_batch_size": 16, "bf16.enabled": True}, []),
    ("new-top-level-key-is-not-a-conflict", {"wall_clock_breakdown": True, "flops_profiler": {"enabled": True}},
     {"wall_clock_breakdown": True, "flops_profiler.enabled": True}, []),
    ("user-replaces-a-dict-with-a-scalar", {"bf16": False}, {"bf16": False},
     [("bf16", False, {"enabled": True})]),
    ("user-replaces-a-scalar-with-a-dict", {"gradient_clipping": {"value": 1.0}},
     {"gradient_clipping": {"value": 1.0}}, [("gradient_clipping", {"value": 1.0}, 1.0)]),
    ("several-conflicts-at-several-depths", {"train_batch_size": 32, "zero_optimization": {"stage": 1},
                                             "optimizer": {"params": {"torch_adam": False}}},
     {"train_batch_size": 32, "zero_optimization.stage": 1, "optimizer.params.torch_adam": False},
     [("train_batch_size", 32, 16), ("zero_optimization.stage", 1, 3), ("optimizer.params.torch_adam", False, True)]),
]


def at(tree, dotted):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("user, expected, conflicts", [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES])
def test_merge_user_keys_win_nested_dicts_merge_and_conflicts_are_reported(user, expected, conflicts):
    merged, lines = merge_user_config(OURS, user)
    for dotted, value in expected.items():
        assert at(merged, dotted) == value, dotted
    assert len(lines) == len(conflicts), lines
    for (dotted, theirs, ours), line in zip(conflicts, lines):
        assert line.startswith(f"{dotted}:"), line
        assert repr(theirs) in line and repr(ours) in line, line


def test_merge_conflict_line_says_which_value_is_the_users_and_which_the_runtimes():
    _, lines = merge_user_config(OURS, {"zero_optimization": {"stage": 2}})
    assert lines == ["zero_optimization.stage: the DeepSpeed JSON sets 2, the runtime chose 3"]


def test_merge_keeps_keys_the_user_did_not_mention():
    merged, _ = merge_user_config(OURS, {"zero_optimization": {"stage": 2}})
    assert set(merged) == set(OURS)
    assert merged["optimizer"] == OURS["optimizer"]


def test_merge_does_not_mutate_either_input():
    ours, user = copy.deepcopy(OURS), {"zero_optimization": {"stage": 2, "overlap_comm": True},
                                       "new": {"a": [1, 2]}, "bf16": {"enabled": False}}
    ours_before, user_before = copy.deepcopy(ours), copy.deepcopy(user)
    merged, _ = merge_user_config(ours, user)
    assert ours == ours_before and user == user_before
    merged["zero_optimization"]["stage"] = 0
    merged["new"]["a"].append(3)
    merged["optimizer"]["params"]["lr"] = 9.0
    assert ours == ours_before and user == user_before


def test_merge_over_the_real_runtime_config_keeps_our_stage():
    ours = ds(lay=layout(zero_stage=2))
    merged, lines = merge_user_config(ours, {"zero_optimization": {"overlap_comm": True}})
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert lines == []


# ------------------------------------------------------------------ train.check_job with backend=deepspeed

@pytest.fixture
def deepspeed_installed(monkeypatch):
    """find_spec says DeepSpeed is there, whether or not it is; nothing imports it."""
    def fake(name, *args, **kwargs):
        if name == "deepspeed":
            return importlib.machinery.ModuleSpec("deepspeed", None)
        return _REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.fixture
def deepspeed_missing(monkeypatch):
    def fake(name, *args, **kwargs):
        if name == "deepspeed":
            return None
        return _REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def ds_cli(**keys) -> Config:
    return load_config(cli=[("parallel.backend", "deepspeed"), *((k.replace("__", "."), str(v))
                                                                  for k, v in keys.items())])


CHECK_OK = [
    # (id, keys, world, expected dp, expected pp, expected (micro, accumulation))
    ("world-4-dp-4", dict(train__batch_size=16), 4, 4, 1, (4, 1)),
    ("world-4-pp-2-gives-dp-2-one-microbatch-per-stage", dict(train__batch_size=16, parallel__pp=2), 4, 2, 2, (4, 2)),
    ("world-4-pp-2-4-microbatches", dict(train__batch_size=16, parallel__pp=2, parallel__microbatches=4),
     4, 2, 2, (2, 4)),
    ("batch-6-divides-over-dp-2-not-world-4", dict(train__batch_size=6, parallel__pp=2, parallel__microbatches=3),
     4, 2, 2, (1, 3)),
    ("world-8-pp-4-zero-0", dict(train__batch_size=8, parallel__pp=4, parallel__zero_stage=0), 8, 2, 4, (1, 4)),
    ("single-process", dict(train__batch_size=4, train__micro_batch_size=1), 1, 1, 1, (1, 4)),
    ("hpz-groups", dict(train__batch_size=16, parallel__shard_group_size=2), 4, 4, 1, (4, 1)),
    # DeepSpeed's pipeline engine runs fewer micro-batches than stages (torch's schedules do not).
    ("pp-2-one-microbatch", dict(train__batch_size=8, parallel__pp=2, parallel__microbatches=1), 4, 2, 2, (4, 1)),
]


@pytest.mark.parametrize("keys, world, dp, pp, micro", [c[1:] for c in CHECK_OK], ids=[c[0] for c in CHECK_OK])
def test_check_splits_the_batch_over_dp_equal_world_over_pp(keys, world, dp, pp, micro, deepspeed_installed):
    cfg = ds_cli(**keys)
    _, dims, _ = train_mod.check_job(cfg, world)
    assert (dims.dp_size, dims.pp, dims.tp) == (dp, pp, 1)
    assert train_mod.deepspeed_batching(cfg, dims.dp_size, dims.pp) == micro


CHECK_BAD = [
    # (id, keys, world, fragment of the message)
    ("batch-not-dividing-dp", dict(train__batch_size=6), 4, "train.batch_size=6"),
    ("batch-not-dividing-dp-after-pipeline", dict(train__batch_size=5, parallel__pp=2), 4, "train.batch_size=5"),
    ("micro-not-dividing-per-replica", dict(train__batch_size=16, train__micro_batch_size=3), 4,
     "train.micro_batch_size=3"),
    ("pipeline-with-zero-3", dict(parallel__pp=2, parallel__zero_stage=3), 4, "pipeline"),
    ("tensor-parallel", dict(parallel__tp=2), 4, "parallel.tp=2"),
    ("explicit-dp-shard", dict(parallel__dp_shard=2), 4, "shard_group_size"),
    ("shard-group-without-zero-3", dict(parallel__zero_stage=2, parallel__shard_group_size=2), 4, "zero_stage=3"),
    ("shard-group-not-dividing-dp", dict(parallel__shard_group_size=3), 4, "shard_group_size=3"),
    ("pp-not-dividing-world", dict(parallel__pp=3), 4, "parallel.pp=3"),
    ("more-stages-than-layers", dict(parallel__pp=8, model__layers=2, train__batch_size=8), 8, "parallel.pp=8"),
    ("steps-zero", dict(train__steps=0), 4, "train.steps"),
]


@pytest.mark.parametrize("keys, world, fragment", [c[1:] for c in CHECK_BAD], ids=[c[0] for c in CHECK_BAD])
def test_check_rejects_bad_deepspeed_job_with_config_error(keys, world, fragment, deepspeed_installed):
    with pytest.raises(ConfigError) as err:
        train_mod.check_job(ds_cli(**keys), world)
    assert fragment in str(err.value)


def test_check_without_deepspeed_installed_names_the_extra(deepspeed_missing):
    with pytest.raises(ConfigError) as err:
        train_mod.check_job(ds_cli(), 4)
    assert "llm-runtime[deepspeed]" in str(err.value)
    assert "parallel.backend=deepspeed" in str(err.value)


def test_check_fsdp_backend_does_not_need_deepspeed(deepspeed_missing):
    _, dims, _ = train_mod.check_job(load_config(cli=[("train.batch_size", "16")]), 4)
    assert dims.dp_size == 4


def test_check_rejects_seq_len_longer_than_the_text_with_deepspeed(deepspeed_installed):
    with pytest.raises(ConfigError, match="train.seq_len"):
        train_mod.check_job(ds_cli(train__seq_len=10_000_000), 4)


def test_check_rejects_a_missing_deepspeed_json_before_workers_start(deepspeed_installed, tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.config"):
        train_mod.check_job(ds_cli(deepspeed__config=tmp_path / "missing.json"), 4)


# ------------------------------------------------------------------ config loading

def test_command_line_selects_deepspeed_stage_and_user_json():
    cfg = load_config(cli=parse_cli_overrides(["--parallel.backend=deepspeed", "--parallel.zero_stage=2",
                                               "--deepspeed.config=x.json", "--parallel.pp", "2"]))
    assert cfg.parallel.backend == "deepspeed"
    assert cfg.parallel.zero_stage == 2
    assert cfg.parallel.pp == 2
    assert cfg.deepspeed.config == "x.json"


def test_deepspeed_defaults():
    cfg = load_config()
    assert cfg.parallel.backend == "fsdp"
    assert cfg.parallel.zero_stage == -1
    assert cfg.parallel.zero_shard_mode == "hpz"
    assert cfg.deepspeed.config == ""


@pytest.mark.parametrize("source", ["env", "toml", "hyper", "cli"])
def test_every_source_sets_deepspeed_keys(source, tmp_path):
    values = {"parallel.backend": "deepspeed", "parallel.zero_stage": "1", "parallel.zero_shard_mode": "mics",
              "deepspeed.config": "ds.json"}
    kw = {}
    if source == "env":
        kw["env"] = {"LLM_RUNTIME_" + k.upper().replace(".", "_"): v for k, v in values.items()}
    elif source == "toml":
        path = tmp_path / "job.toml"
        path.write_text('[parallel]\nbackend = "deepspeed"\nzero_stage = 1\nzero_shard_mode = "mics"\n'
                        '[deepspeed]\nconfig = "ds.json"\n')
        kw["toml_path"] = path
    elif source == "hyper":
        kw["hyperparameters"] = values
    else:
        kw["cli"] = list(values.items())
    cfg = load_config(**kw)
    assert (cfg.parallel.backend, cfg.parallel.zero_stage, cfg.parallel.zero_shard_mode, cfg.deepspeed.config) == \
        ("deepspeed", 1, "mics", "ds.json")


def test_environment_variable_llm_runtime_deepspeed_config_sets_the_user_json():
    assert load_config(env={"LLM_RUNTIME_DEEPSPEED_CONFIG": "/opt/ds.json"}).deepspeed.config == "/opt/ds.json"


BAD_VALUES = [
    ("parallel.zero_shard_mode", "zeropp", "command line --parallel.zero_shard_mode"),
    ("parallel.zero_shard_mode", "HPZ", "command line --parallel.zero_shard_mode"),
    ("parallel.backend", "megatron", "command line --parallel.backend"),
    ("parallel.zero_stage", "three", "command line --parallel.zero_stage"),
]


@pytest.mark.parametrize("key, value, source", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_deepspeed_value_is_rejected_naming_the_key(key, value, source):
    with pytest.raises(ConfigError) as err:
        load_config(cli=[(key, value)])
    assert key in str(err.value)
    assert repr(value) in str(err.value)
    assert source in str(err.value)


def test_bad_zero_shard_mode_from_environment_names_the_variable():
    with pytest.raises(ConfigError) as err:
        load_config(env={"LLM_RUNTIME_PARALLEL_ZERO_SHARD_MODE": "zeropp"})
    assert "parallel.zero_shard_mode" in str(err.value)
    assert "LLM_RUNTIME_PARALLEL_ZERO_SHARD_MODE" in str(err.value)


def test_unknown_deepspeed_section_key_is_rejected():
    with pytest.raises(ConfigError, match="deepspeed.json"):
        load_config(cli=[("deepspeed.json", "x.json")])


@pytest.mark.parametrize("keys, needle", [
    (dict(train__batch_size=16, parallel__pp=2, train__micro_batch_size=2), "parallel.microbatches"),
    (dict(train__batch_size=6, parallel__pp=2), "parallel.microbatches=2 does not divide"),
    (dict(train__batch_size=16, parallel__compile=True), "fsdp backend"),
    (dict(train__batch_size=16, parallel__shard_group_size=1), "2 or more ranks"),
], ids=["micro-batch-size-with-pipeline", "microbatches-not-dividing", "fsdp-only-key", "shard-group-of-one"])
def test_deepspeed_settings_it_would_ignore_or_cannot_run_are_refused(keys, needle, deepspeed_installed):
    with pytest.raises(ConfigError, match=needle):
        train_mod.check_job(ds_cli(**keys), 4)


@pytest.mark.parametrize("user, needle", [
    ({"train_batch_size": 32}, "train_batch_size=32; the runtime owns it"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"zero_optimization": {"stage": 3}}, "pipeline engine supports stage 0 or 1"),
], ids=["batch", "accumulation", "scheduler", "stage-3-with-pipeline"])
def test_user_json_cannot_change_what_the_trainer_depends_on(user, needle, tmp_path, deepspeed_installed):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match=needle):
        train_mod.check_job(ds_cli(train__batch_size=16, parallel__pp=2, deepspeed__config=str(path)), 4)
