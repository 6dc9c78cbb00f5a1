"""DeepSpeed pipeline layers built from specs are the bundled model, weight for weight."""
import pytest
import torch

from llm_runtime.models import Llama, LlamaConfig
from llm_runtime.parallel.deepspeed_engine import _Block, _Embed, _Head


@pytest.mark.parametrize("checkpoint", ["none", "full"])
def test_layers_built_one_by_one_equal_the_full_model(checkpoint):
    config = LlamaConfig(dim=32, layers=3, heads=4, max_seq_len=16)
    full = Llama(config)
    full.init_weights(torch.Generator().manual_seed(7))
    layers = [_Embed(config, 7), *(_Block(config, 7, i, checkpoint) for i in range(3)), _Head(config, 7)]
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = tokens
    for layer in layers:
        hidden = layer(hidden)
    assert torch.equal(hidden, full(tokens))
    for index, block in enumerate(layers[1:-1]):  # real (not meta) weights, the full model's own
        for name, param in block.block.named_parameters():
            assert torch.equal(param, full.get_parameter(f"layers.{index}.{name}"))
