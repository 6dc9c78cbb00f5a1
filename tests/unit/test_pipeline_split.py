"""Pipeline splits without a process group: split_layers, stage_indices, build_stage_modules on the
bundled Llama, parse_split_points, and the pipeline checks train.check_job() runs before any worker starts."""
from __future__ import annotations

import re

import pytest
import torch

from llm_runtime.config import ConfigError, load_config, validate
from llm_runtime.models import Llama, LlamaConfig
from llm_runtime.parallel.pipeline import build_stage_modules, split_layers, stage_indices
from llm_runtime.parallel.pipeline import parse_split_points
from llm_runtime.train import check_job


def check(config, world, **options):
    """(model config, dims) of train.check_job."""
    return check_job(config, world, **options)[:2]

TINY = LlamaConfig(dim=32, layers=4, heads=4)


def as_pairs(ranges):
    return [(r.start, r.stop) for r in ranges]


def config_with(overrides: dict):
    return load_config(cli=[(key, str(value)) for key, value in overrides.items()])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(TINY).eval()


# ------------------------------------------------------------------ split_layers

@pytest.mark.parametrize("layers, stages, expected", [
    (4, 1, [(0, 4)]),
    (4, 2, [(0, 2), (2, 4)]),
    (5, 2, [(0, 3), (3, 5)]),
    (7, 3, [(0, 3), (3, 5), (5, 7)]),
    (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
    (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    (32, 3, [(0, 11), (11, 22), (22, 32)]),
])
def test_even_split_gives_the_remainder_to_the_earlier_stages(layers, stages, expected):
    assert as_pairs(split_layers(layers, stages)) == expected


@pytest.mark.parametrize("layers, stages", [(n, s) for n in range(1, 13) for s in range(1, n + 1)])
def test_even_split_covers_every_layer_once_with_sizes_differing_by_at_most_one(layers, stages):
    ranges = split_layers(layers, stages)
    assert len(ranges) == stages
    assert [i for r in ranges for i in r] == list(range(layers))
    sizes = [len(r) for r in ranges]
    assert sizes == sorted(sizes, reverse=True)
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 1


@pytest.mark.parametrize("layers, stages, points, expected", [
    (8, 3, [3, 6], [(0, 3), (3, 6), (6, 8)]),
    (4, 2, [1], [(0, 1), (1, 4)]),
    (4, 2, [3], [(0, 3), (3, 4)]),
    (4, 4, [1, 2, 3], [(0, 1), (1, 2), (2, 3), (3, 4)]),
    (10, 2, (7,), [(0, 7), (7, 10)]),
    (6, 1, [], [(0, 6)]),
])
def test_explicit_split_points_are_where_stages_begin(layers, stages, points, expected):
    assert as_pairs(split_layers(layers, stages, points)) == expected


@pytest.mark.parametrize("layers, stages", [(3, 4), (1, 2), (4, 8), (2, 3)])
def test_more_stages_than_layers_is_an_error_mentioning_the_layer_count(layers, stages):
    with pytest.raises(ValueError) as info:
        split_layers(layers, stages)
    message = str(info.value)
    assert "layer" in message
    assert re.search(rf"\b{layers}\b", message), message


def test_zero_pipeline_stages_is_an_error():
    with pytest.raises(ValueError, match="stage"):
        split_layers(4, 0)


@pytest.mark.parametrize("layers, stages, points", [
    (8, 3, [3]),
    (8, 3, [2, 4, 6]),
    (8, 2, [2, 4]),
    (4, 1, [2]),
    (8, 3, [6, 3]),
    (8, 3, [3, 3]),
    (8, 3, [0, 4]),
    (8, 3, [-1, 4]),
    (8, 3, [3, 8]),
    (8, 3, [3, 9]),
], ids=["too-few", "too-many", "too-many-two-stages", "points-for-one-stage", "decreasing", "repeated",
        "starts-at-zero", "negative", "at-layer-count", "beyond-layer-count"])
def test_bad_split_points_are_an_error_naming_the_key(layers, stages, points):
    with pytest.raises(ValueError, match=r"parallel\.pp_split_points"):
        split_layers(layers, stages, points)


# ------------------------------------------------------------------ stage_indices

@pytest.mark.parametrize("pp_rank, pp, per_rank, expected", [
    (0, 1, 1, [0]),
    (0, 4, 1, [0]),
    (3, 4, 1, [3]),
    (0, 2, 2, [0, 2]),
    (1, 4, 2, [1, 5]),
    (3, 4, 3, [3, 7, 11]),
])
def test_each_rank_holds_looped_stages_rank_plus_multiples_of_pp(pp_rank, pp, per_rank, expected):
    assert stage_indices(pp_rank, pp, per_rank) == expected


@pytest.mark.parametrize("pp, per_rank", [(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)])
def test_looped_placement_gives_every_stage_to_exactly_one_rank(pp, per_rank):
    held = [s for r in range(pp) for s in stage_indices(r, pp, per_rank)]
    assert sorted(held) == list(range(pp * per_rank))


# ------------------------------------------------------------------ build_stage_modules on the bundled Llama

STAGE_LAYOUTS = [
    # (id, number of stages, split points, stages to build)
    ("one-stage", 1, [], [0]),
    ("two-even", 2, [], [0, 1]),
    ("two-split-at-1", 2, [1], [0, 1]),
    ("two-split-at-3", 2, [3], [0, 1]),
    ("three-uneven", 3, [], [0, 1, 2]),
    ("four-one-layer-each", 4, [], [0, 1, 2, 3]),
]
STAGE_IDS = [c[0] for c in STAGE_LAYOUTS]
STAGE_PARAMS = [c[1:] for c in STAGE_LAYOUTS]


def layer_of(name: str) -> int | None:
    match = re.match(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("num_stages, points, stages", STAGE_PARAMS, ids=STAGE_IDS)
def test_stage_parameter_names_match_the_unsplit_model_for_its_layers(model, num_stages, points, stages):
    ranges = split_layers(TINY.layers, num_stages, points)
    full = dict(model.named_parameters())
    for stage, part in zip(stages, build_stage_modules(model, stages, ranges)):
        names = [n for n, _ in part.named_parameters()]
        layer_names = {n for n in names if layer_of(n) is not None}
        assert layer_names == {n for n in full if layer_of(n) in ranges[stage]}
        assert set(names) <= set(full)


def test_spec_example_stage_holding_layer_2_names_it_layers_2_attention_wq(model):
    ranges = split_layers(4, 2)
    _, second = build_stage_modules(model, [0, 1], ranges)
    assert "layers.2.attention.wq.weight" in dict(second.named_parameters())
    assert "layers.1.attention.wq.weight" not in dict(second.named_parameters())


@pytest.mark.parametrize("num_stages, points, stages", STAGE_PARAMS, ids=STAGE_IDS)
def test_only_the_first_stage_keeps_embeddings_and_only_the_last_keeps_norm_and_output(
        model, num_stages, points, stages):
    ranges = split_layers(TINY.layers, num_stages, points)
    for stage, part in zip(stages, build_stage_modules(model, stages, ranges)):
        assert (part.tok_embeddings is not None) == (stage == 0), stage
        assert (part.norm is not None) == (stage == num_stages - 1), stage
        assert (part.output is not None) == (stage == num_stages - 1), stage
        keys = part.state_dict().keys()
        assert ("tok_embeddings.weight" in keys) == (stage == 0)
        assert ("norm.weight" in keys) == ("output.weight" in keys) == (stage == num_stages - 1)


@pytest.mark.parametrize("num_stages, points, stages", STAGE_PARAMS, ids=STAGE_IDS)
def test_all_stages_together_hold_exactly_the_full_models_state_dict(model, num_stages, points, stages):
    ranges = split_layers(TINY.layers, num_stages, points)
    parts = build_stage_modules(model, stages, ranges)
    key_sets = [set(part.state_dict()) for part in parts]
    assert set().union(*key_sets) == set(model.state_dict())
    assert sum(len(keys) for keys in key_sets) == len(model.state_dict()), "a key is held by two stages"


def test_interleaved_rank_builds_its_looped_stages(model):
    ranges = split_layers(4, 4)  # pp=2 x 2 stages per rank
    first, third = build_stage_modules(model, stage_indices(0, 2, 2), ranges)
    assert sorted(layer_of(n) for n in dict(first.named_parameters()) if layer_of(n) is not None)[0] == 0
    assert {layer_of(n) for n in dict(first.named_parameters())} == {0, None}
    assert {layer_of(n) for n in dict(third.named_parameters())} == {2}
    assert first.tok_embeddings is not None and first.output is None
    assert third.tok_embeddings is None and third.output is None
    second, last = build_stage_modules(model, stage_indices(1, 2, 2), ranges)
    assert second.tok_embeddings is None and second.output is None
    assert last.output is not None and last.norm is not None


def test_stages_share_the_models_weights_rather_than_copying_them(model):
    first, second = build_stage_modules(model, [0, 1], split_layers(4, 2))
    assert first.tok_embeddings.weight is model.tok_embeddings.weight
    assert second.output.weight is model.output.weight
    assert second.layers["3"].feed_forward.w1.weight is model.layers[3].feed_forward.w1.weight


def test_splitting_leaves_the_original_model_whole(model):
    before = set(model.state_dict())
    build_stage_modules(model, [0, 1, 2, 3], split_layers(4, 4))
    assert set(model.state_dict()) == before
    assert model.tok_embeddings is not None and model.norm is not None and model.output is not None
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 4


@pytest.mark.parametrize("num_stages, points, stages", STAGE_PARAMS, ids=STAGE_IDS)
def test_stages_chained_by_hand_compute_the_same_logits_as_the_full_model(model, num_stages, points, stages):
    tokens = torch.randint(0, TINY.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    parts = build_stage_modules(model, stages, split_layers(TINY.layers, num_stages, points))
    with torch.no_grad():
        expected = model(tokens)
        hidden = tokens
        for part in parts:
            hidden = part(hidden)
    assert hidden.shape == expected.shape == (2, 7, TINY.vocab_size)
    assert torch.allclose(hidden, expected, atol=1e-6)


def test_middle_stage_passes_hidden_states_not_logits(model):
    parts = build_stage_modules(model, [0, 1, 2], split_layers(4, 3))
    tokens = torch.randint(0, TINY.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = parts[0](tokens)
        assert hidden.shape == (1, 5, TINY.dim)
        hidden = parts[1](hidden)
        assert hidden.shape == (1, 5, TINY.dim)
        assert parts[2](hidden).shape == (1, 5, TINY.vocab_size)


# ------------------------------------------------------------------ parse_split_points

@pytest.mark.parametrize("text, expected", [
    ("3, 6", [3, 6]),
    ("3,6", [3, 6]),
    (" 2 ", [2]),
    ("", []),
    ("1,2,3", [1, 2, 3]),
])
def test_split_points_text_becomes_layer_indices(text, expected):
    assert parse_split_points(text) == expected


@pytest.mark.parametrize("text", ["three", "3;6", "3.5", "3,x", "[3, 6]"])
def test_garbage_split_points_are_a_config_error_naming_the_key_and_its_source(text):
    with pytest.raises(ValueError, match=r"parallel\.pp_split_points"):
        parse_split_points(text)
    with pytest.raises(ConfigError, match=r"parallel\.pp_split_points.*from command line"):
        validate(load_config(cli=[("parallel.pp_split_points", text)]))


# ------------------------------------------------------------------ train.check_job: pipeline settings

PIPELINE_ERRORS = [
    # (id, config overrides, world size, text the message must contain)
    ("pp-larger-than-layers", {"model.layers": 4, "parallel.pp": 8}, 8, "the model has 4"),
    ("interleaved-stages-exceed-layers",
     {"model.layers": 4, "parallel.pp": 4, "parallel.pp_schedule": "interleaved"}, 4, "the model has 4"),
    ("microbatches-do-not-divide-replica-batch",
     {"train.batch_size": 16, "parallel.pp": 2, "parallel.microbatches": 3}, 2, "parallel.microbatches=3"),
    ("microbatches-do-not-divide-after-dp",
     {"train.batch_size": 16, "parallel.pp": 2, "parallel.microbatches": 16}, 4, "parallel.microbatches=16"),
    ("interleaved-microbatches-not-multiple-of-pp",
     {"train.batch_size": 12, "parallel.pp": 2, "parallel.pp_schedule": "interleaved", "parallel.microbatches": 3},
     2, "multiple of parallel.pp"),
    ("stages-per-rank-without-interleaved",
     {"parallel.pp": 2, "parallel.stages_per_rank": 2, "parallel.pp_schedule": "1f1b"}, 2, "parallel.stages_per_rank"),
    ("stages-per-rank-with-gpipe",
     {"parallel.pp": 2, "parallel.stages_per_rank": 2, "parallel.pp_schedule": "gpipe"}, 2, "interleaved"),
    ("split-points-wrong-count", {"parallel.pp": 2, "parallel.pp_split_points": "1,2"}, 2, "parallel.pp_split_points"),
    ("split-points-out-of-range", {"parallel.pp": 2, "parallel.pp_split_points": "4"}, 2, "parallel.pp_split_points"),
    ("split-points-garbage", {"parallel.pp": 2, "parallel.pp_split_points": "two"}, 2, "parallel.pp_split_points"),
]


@pytest.mark.parametrize("overrides, world, needle", [c[1:] for c in PIPELINE_ERRORS],
                         ids=[c[0] for c in PIPELINE_ERRORS])
def test_pipeline_setting_the_job_cannot_run_is_a_config_error_before_any_worker(overrides, world, needle):
    with pytest.raises(ConfigError) as info:
        check(config_with(overrides), world)
    assert needle in str(info.value)


PIPELINE_OK = [
    ("pp2-default-microbatches", {"parallel.pp": 2}, 2),
    ("pp2-with-split-points", {"parallel.pp": 2, "parallel.pp_split_points": "1"}, 2),
    ("pp4-one-layer-each", {"parallel.pp": 4}, 4),
    ("interleaved-pp2", {"parallel.pp": 2, "parallel.pp_schedule": "interleaved", "parallel.microbatches": 4}, 2),
    ("interleaved-explicit-stages", {"model.layers": 6, "parallel.pp": 2, "parallel.pp_schedule": "interleaved",
                                     "parallel.stages_per_rank": 3, "parallel.microbatches": 2}, 2),
    ("pp-with-dp", {"train.batch_size": 16, "parallel.pp": 2, "parallel.microbatches": 8}, 4),
]


@pytest.mark.parametrize("overrides, world", [c[1:] for c in PIPELINE_OK], ids=[c[0] for c in PIPELINE_OK])
def test_runnable_pipeline_settings_pass_check(overrides, world):
    _, resolved = check(config_with(overrides), world)
    assert resolved.pp == overrides["parallel.pp"]


@pytest.mark.parametrize("overrides, needle", [
    ({"train.micro_batch_size": 2}, "parallel.microbatches"),
    ({"parallel.microbatches": 1}, "fewer than the 2 pipeline stages"),
])
def test_pipeline_settings_the_schedule_cannot_run_are_refused_before_launch(overrides, needle):
    from llm_runtime.config import ConfigError, load_config

    cli = [("parallel.pp", "2"), ("model.layers", "4"), ("train.batch_size", "8")]
    cli += [(key, str(value)) for key, value in overrides.items()]
    with pytest.raises(ConfigError, match=needle):
        check(load_config(cli=cli), 2)
