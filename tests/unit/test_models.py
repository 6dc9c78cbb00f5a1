"""Unit tests for the bundled Llama, byte tokenizer and demo corpus (CPU, tiny sizes)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_runtime.models import ByteTokenizer, Llama, LlamaConfig, bundled_text

DEDICATION = (
    "This text was written for llm_runtime and is dedicated to the public domain (CC0 1.0)."
)


def tiny_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=256, dim=32, layers=2, heads=4, max_seq_len=32)
    fields.update(overrides)
    return LlamaConfig(**fields)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tokens(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq_len), generator=seeded(seed))


def test_forward_shape():
    model = Llama(tiny_config())
    logits = model(random_tokens(3, 16))
    assert logits.shape == (3, 16, 256)
    assert logits.dtype == torch.float32


def test_loss_at_init_is_near_uniform():
    model = Llama(tiny_config())
    tokens = random_tokens(4, 32, seed=1)
    targets = random_tokens(4, 32, seed=2)
    loss = model.loss(tokens, targets)
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(256)) < 0.3


def test_same_seed_gives_identical_weights_and_different_seed_differs():
    first = Llama(tiny_config())
    second = Llama(tiny_config())
    other = Llama(tiny_config())
    first.init_weights(seeded(7))
    second.init_weights(seeded(7))
    other.init_weights(seeded(8))
    first_state, second_state, other_state = (
        first.state_dict(),
        second.state_dict(),
        other.state_dict(),
    )
    assert first_state.keys() == second_state.keys()
    for name, tensor in first_state.items():
        assert torch.equal(tensor, second_state[name]), name
    differing = [
        name
        for name, tensor in first_state.items()
        if not name.endswith("norm.weight") and not torch.equal(tensor, other_state[name])
    ]
    assert "layers.0.attention.wq.weight" in differing
    assert "tok_embeddings.weight" in differing
    assert "output.weight" in differing


def test_init_ignores_global_rng_and_scales_residual_projections():
    torch.manual_seed(123)
    first = Llama(tiny_config(layers=8))
    torch.manual_seed(456)
    second = Llama(tiny_config(layers=8))
    assert torch.equal(
        first.layers[3].feed_forward.w1.weight, second.layers[3].feed_forward.w1.weight
    )
    wq_std = first.layers[0].attention.wq.weight.std().item()
    wo_std = first.layers[0].attention.wo.weight.std().item()
    assert wq_std == pytest.approx(0.02, rel=0.1)
    assert wo_std == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert torch.equal(first.norm.weight, torch.ones(32))


def test_attribute_names_are_stable():
    names = dict(Llama(tiny_config()).named_parameters())
    for expected in (
        "tok_embeddings.weight",
        "layers.1.attention_norm.weight",
        "layers.1.attention.wq.weight",
        "layers.1.attention.wk.weight",
        "layers.1.attention.wv.weight",
        "layers.1.attention.wo.weight",
        "layers.1.ffn_norm.weight",
        "layers.1.feed_forward.w1.weight",
        "layers.1.feed_forward.w2.weight",
        "layers.1.feed_forward.w3.weight",
        "norm.weight",
        "output.weight",
    ):
        assert expected in names
    # Rotary tables are derived, so they must not bloat checkpoints.
    assert not any("rotary" in key for key in Llama(tiny_config()).state_dict())


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = Llama(tiny_config()).eval()
    tokens = random_tokens(2, 16, seed=3)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        before = model(tokens)
        after = model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_a_few_steps_on_a_repeated_batch_reduce_loss():
    torch.manual_seed(0)
    model = Llama(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sequence = random_tokens(2, 17, seed=4)
    tokens, targets = sequence[:, :-1], sequence[:, 1:]
    losses = []
    for _ in range(10):
        loss = model.loss(tokens, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dim": 30, "heads": 4}, "dim"),
        ({"heads": 4, "kv_heads": 3}, "kv_heads"),
        ({"layers": 0}, "layers"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"heads": 0}, "heads"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"ffn_hidden": 0}, "ffn_hidden"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=field):
        config.validate()
    with pytest.raises(ValueError, match=field):
        Llama(config)


def test_default_config_is_valid_and_derives_llama_ffn_hidden():
    config = LlamaConfig()
    assert config.validate() is config
    assert config.num_kv_heads == config.heads
    assert config.ffn_hidden_dim == 352  # int(8 * 128 / 3) = 341, rounded up to 32
    assert LlamaConfig(ffn_hidden=100).ffn_hidden_dim == 100


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = Llama(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(1, 9))


def test_grouped_query_attention():
    config = tiny_config(heads=4, kv_heads=2)
    model = Llama(config)
    attention = model.layers[0].attention
    assert attention.wq.weight.shape == (32, 32)
    assert attention.wk.weight.shape == (16, 32)
    assert attention.wv.weight.shape == (16, 32)
    logits = model(random_tokens(2, 8))
    assert logits.shape == (2, 8, 256)
    assert model.num_parameters() < Llama(tiny_config(heads=4)).num_parameters()


def test_num_parameters_matches_config_and_excludes_embeddings():
    config = tiny_config(kv_heads=2)
    model = Llama(config)
    total = sum(parameter.numel() for parameter in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total - 256 * 32
    assert config.num_parameters() == total
    assert config.num_parameters(exclude_embeddings=True) == total - 256 * 32


def test_flops_per_token_positive_and_grows_with_seq_len():
    config = tiny_config()
    short = config.flops_per_token(16)
    long = config.flops_per_token(32)
    assert short > 0
    assert long > short
    non_embedding = Llama(config).num_parameters(exclude_embeddings=True)
    assert short == 6 * non_embedding + 12 * config.layers * config.dim * 16
    with pytest.raises(ValueError, match="seq_len"):
        config.flops_per_token(0)


def test_pipeline_stage_pieces_can_be_none():
    model = Llama(tiny_config()).eval()
    tokens = random_tokens(2, 8)
    with torch.no_grad():
        full = model(tokens)
        first = Llama(tiny_config())
        first.load_state_dict(model.state_dict())
        del first.layers[1]
        first.norm = None
        first.output = None
        last = Llama(tiny_config())
        last.load_state_dict(model.state_dict())
        del last.layers[0]
        last.tok_embeddings = None
        hidden = first(tokens)
        assert hidden.shape == (2, 8, 32)
        staged = last(hidden)
    assert torch.allclose(full, staged, atol=1e-6)


def test_tokenizer_round_trip_including_non_ascii():
    tokenizer = ByteTokenizer()
    text = "Alder Bend — café, naïve, 東京, 🚢"
    ids = tokenizer.encode(text)
    assert all(0 <= token < 256 for token in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    array = tokenizer.encode_array(text)
    assert array.dtype == np.uint8
    assert tokenizer.decode(array) == text
    as_long = tokenizer.encode_array(text, dtype=np.int64)
    assert as_long.dtype == np.int64
    assert tokenizer.decode(torch.from_numpy(as_long)) == text
    assert ByteTokenizer.vocab_size == 256


def test_tokenizer_replaces_invalid_utf8_and_rejects_out_of_range_ids():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([0xFF, 65]) == "\ufffdA"
    with pytest.raises(ValueError, match="256"):
        tokenizer.decode([256])
    with pytest.raises(ValueError, match="text"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_bundled_text_is_large_prose_with_dedication():
    text = bundled_text()
    assert len(text.encode("utf-8")) >= 20_000
    assert text.splitlines()[0] == DEDICATION
    words = text.split()
    assert len(set(words)) > 1000  # varied vocabulary, not filler


def test_meta_device_model_materialises_to_the_same_weights():
    with torch.device("meta"):
        lazy = Llama(tiny_config())
    assert lazy.layers[0].attention.wq.weight.is_meta
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    eager = Llama(tiny_config())
    for (name, tensor), expected in zip(lazy.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(tensor, expected), name
    assert torch.equal(lazy.rotary.cos, eager.rotary.cos)


def test_bfloat16_forward_keeps_float32_rotary_tables():
    model = Llama(tiny_config()).to(torch.bfloat16)
    cos, _ = model.rotary(8)
    assert cos.dtype == torch.float32
    assert model(random_tokens(1, 8)).dtype == torch.bfloat16
