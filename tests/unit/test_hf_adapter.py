"""models/hf.py: HF causal LMs wrapped for parallelize (tiny random configs, nothing downloaded)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llm_runtime.models.hf import HFCausalLM, check_hf_layout, hf_tp_plan
from llm_runtime.parallel.materialize import materialize

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
BUILD = {"llama": (LlamaForCausalLM, LlamaConfig), "mistral": (MistralForCausalLM, MistralConfig),
         "qwen2": (Qwen2ForCausalLM, Qwen2Config)}


def hf(family, **extra):
    cls, config = BUILD[family]
    torch.manual_seed(0)
    return cls(config(**SIZES, **extra)).eval()


@pytest.mark.parametrize("family, extra", [("llama", {}), ("mistral", {}), ("qwen2", {"tie_word_embeddings": True})])
def test_the_wrapped_model_gives_hfs_logits_even_when_built_with_eager_attention(family, extra):
    model = hf(family, attn_implementation="eager", **extra)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    wrapped = HFCausalLM(model)
    assert torch.allclose(wrapped(tokens), model(tokens).logits, atol=1e-6)
    assert wrapped.tied == bool(extra.get("tie_word_embeddings"))
    assert HFCausalLM.hf_name("layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert HFCausalLM.hf_name("lm_head.weight") == "lm_head.weight"
    names = {HFCausalLM.hf_name(n) for n, _ in wrapped.named_parameters()}
    assert names == set(dict(model.named_parameters()))


def test_two_pipeline_stages_of_the_wrapped_model_compose_to_hfs_logits():
    from llm_runtime.parallel.pipeline import build_stage_modules, split_layers

    model = hf("mistral")
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    wrapped = HFCausalLM(model)
    options = wrapped.parallel_options()
    first, last = build_stage_modules(wrapped, [0, 1], split_layers(2, 2), layers_attr="layers",
                                      first_only=options["first_only"], last_only=options["last_only"])
    hidden = first(tokens)
    assert first.lm_head is None and last.embed_tokens is None and hidden.shape == (2, 8, 32)
    assert torch.allclose(last(hidden), model(tokens).logits, atol=1e-6)


def test_the_tp_plan_comes_from_the_familys_base_model_tp_plan():
    plan = hf_tp_plan(hf("qwen2"))
    assert sorted(plan) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                            "self_attn.q_proj", "self_attn.v_proj"]
    assert type(plan["self_attn.o_proj"]).__name__ == "RowwiseParallel"
    assert type(plan["self_attn.q_proj"]).__name__ == "ColwiseParallel"


def test_a_meta_model_materialises_with_the_familys_init_and_keeps_its_tie():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True, initializer_range=0.05))
    wrapped = HFCausalLM(model)
    materialize([wrapped], torch.device("cpu"), wrapped.init_fn(torch.Generator().manual_seed(1)))
    assert wrapped.lm_head.weight is wrapped.embed_tokens.weight
    layer = wrapped.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(32))
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros(32))
    assert abs(layer.mlp.up_proj.weight.std().item() - 0.05) < 0.01
    assert not torch.equal(layer.mlp.up_proj.weight, wrapped.layers[1].mlp.up_proj.weight)
    assert wrapped.rotary_emb.inv_freq.device.type == "cpu" and torch.isfinite(wrapped(torch.zeros(1, 4).long())).all()


@pytest.mark.parametrize("config, layout, message", [
    ({"model_type": "gpt2"}, {}, "model_type='gpt2' is not supported; supported: llama"),
    ({"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 64},
     {"tp": 4}, "parallel.tp=4 must divide config.json num_attention_heads \\(6\\)"),
    ({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 64},
     {"tp": 4}, "num_key_value_heads \\(2\\)"),
    ({"model_type": "qwen2", "tie_word_embeddings": True}, {"pp": 2}, "parallel.pp=2 is not supported for tied"),
    ({"model_type": "mistral", "sliding_window": 16}, {"seq_len": 32}, "sliding_window=16 is shorter than train.seq_len=32"),
    ({"model_type": "llama", "max_position_embeddings": 16}, {"seq_len": 32}, "exceeds max_position_embeddings=16"),
])
def test_a_config_the_layout_cannot_run_is_refused_naming_the_key(config, layout, message):
    with pytest.raises(ValueError, match=message):
        check_hf_layout(config, **{"tp": 1, "pp": 1, "seq_len": 8, **layout})


@pytest.mark.parametrize("config", [
    {"model_type": "qwen2", "sliding_window": 16, "use_sliding_window": False},
    {"model_type": "mistral", "sliding_window": None},
    {"model_type": "llama", "max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
])
def test_settings_the_runtime_honours_pass_the_layout_check(config):
    check_hf_layout(config, tp=1, pp=1, seq_len=32)


@pytest.mark.parametrize("recorded, present, fetch", [
    ({}, {}, ["a.safetensors", "config.json"]),                                      # nothing staged yet
    ({"a.safetensors": [5, "e1"], "config.json": [2, "c"]}, {"a.safetensors": 5, "config.json": 2}, []),
    ({"a.safetensors": [5, "e0"], "config.json": [2, "c"]}, {"a.safetensors": 5, "config.json": 2},
     ["a.safetensors"]),                                                             # re-uploaded, same size
    ({"a.safetensors": [5, "e1"], "config.json": [2, "c"]}, {"a.safetensors": 3, "config.json": 2},
     ["a.safetensors"]),                                                             # cut short on disk
    ({}, {"a.safetensors": 5, "config.json": 2}, ["a.safetensors", "config.json"]),  # no record: not trusted
])
def test_staging_fetches_what_is_missing_resized_or_reuploaded_and_config_json_last(recorded, present, fetch):
    from llm_runtime.models.hf_source import stale

    listed = {"config.json": (2, "c"), "a.safetensors": (5, "e1")}
    assert stale(listed, recorded, present) == fetch
