"""Meta-device models materialised by parallelize (one process; the sharded cases run in
tests/distributed: every layout-equivalence job builds the bundled model on the meta device)."""
import logging

import pytest
import torch
from torch import nn

from llm_runtime.models import Llama, LlamaConfig
from llm_runtime.parallel.api import parallelize
from llm_runtime.parallel.dims import ParallelDims
from llm_runtime.parallel.materialize import has_meta, materialize

ONE = ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=1)
CONFIG = LlamaConfig(vocab_size=64, dim=32, layers=2, heads=4, max_seq_len=16)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_the_bundled_model_built_on_meta_materialises_to_the_eager_models_weights_and_tables():
    eager = Llama(CONFIG)
    eager.init_weights(seeded(5))
    with torch.device("meta"):
        lazy = Llama(CONFIG)
    assert has_meta(lazy)
    model = parallelize(lazy, ONE, rank=0, device=torch.device("cpu"), init_fn=lazy.init_fn(seeded(5)))
    (part,) = model.parts
    assert not has_meta(part)
    for (name, got), want in zip([*part.named_parameters(), *part.named_buffers()],
                                 [*eager.parameters(), *eager.buffers()], strict=True):
        assert torch.equal(got, want), name
    tokens = torch.randint(0, 64, (2, 16), generator=seeded(0))
    assert torch.equal(part(tokens), eager(tokens))


def test_init_fn_fills_every_parameter_by_its_name_in_the_unsplit_model():
    seen = []

    def init_fn(name, tensor):
        seen.append((name, tuple(tensor.shape), tensor.device.type))
        tensor.fill_(0.5)

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    materialize([model], torch.device("cpu"), init_fn)
    assert seen == [("0.weight", (8, 4), "cpu"), ("0.bias", (8,), "cpu"), ("1.weight", (2, 8), "cpu"),
                    ("1.bias", (2,), "cpu")]
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in model.parameters())


def test_without_init_fn_reset_parameters_runs_and_the_log_says_the_weights_depend_on_the_layout(caplog):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    with caplog.at_level(logging.WARNING, logger="llm_runtime.parallel.materialize"):
        materialize([model], torch.device("cpu"), None)
    assert "depend on the parallel layout" in caplog.text and "init_fn" in caplog.text
    assert not has_meta(model)
    assert torch.equal(model[1].weight, torch.ones(8)) and torch.equal(model[0].bias.abs() <= 0.5, torch.ones(8, dtype=bool))


def test_a_buffer_built_for_real_keeps_its_values_and_a_meta_buffer_goes_to_init_fn():
    class WithBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(3, device="meta"))
            self.register_buffer("table", torch.arange(3.0))  # real: computed at construction
            self.register_buffer("lazy", torch.empty(2, device="meta"), persistent=False)

    names = []
    model = WithBuffers()
    materialize([model], torch.device("cpu"), lambda name, tensor: (names.append(name), tensor.fill_(7.0)))
    assert torch.equal(model.table, torch.arange(3.0)) and torch.equal(model.lazy, torch.full((2,), 7.0))
    assert sorted(names) == ["lazy", "weight"]


def test_llama_init_fn_refuses_a_name_it_does_not_know():
    fill = Llama(CONFIG).init_fn(seeded(1))
    with pytest.raises(ValueError, match="no initialisation for 'layers.0.attention'"):
        fill("layers.0.attention", torch.empty(2))


def test_a_real_parameter_of_a_partly_meta_model_keeps_its_values():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    before = model[0].weight.detach().clone()
    materialize([model], torch.device("cpu"), lambda name, tensor: tensor.fill_(3.0))
    assert torch.equal(model[0].weight, before) and torch.equal(model[1].weight, torch.full((2, 2), 3.0))


def test_tied_parameters_of_a_meta_model_stay_one_parameter_after_materialising():
    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight
    filled = []
    materialize([model], torch.device("cpu"), lambda name, tensor: (filled.append(name), tensor.fill_(2.0)))
    assert model[1].weight is model[0].weight and filled == ["0.weight"]
    assert torch.equal(model[1].weight, torch.full((8, 4), 2.0))
