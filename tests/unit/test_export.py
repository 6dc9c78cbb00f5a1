"""The final export's pure parts: which tensor goes in which file, and the bundled Llama as HF's."""
import pytest
import torch

from llm_runtime.checkpoint.export import file_names, plan_files
from llm_runtime.models import Llama, LlamaConfig
from llm_runtime.models.llama_hf import from_hf, hf_config, hf_name, to_hf

MB = 1 << 20


@pytest.mark.parametrize("entries, limit, files", [
    ([("a", 1, 0), ("b", 1, 0), ("c", 1, 0)], 2, [["a", "b"], ["c"]]),
    ([("a", 3, 0), ("b", 1, 0)], 2, [["a"], ["b"]]),               # a tensor over the limit: a file of its own
    ([("a", 1, 0), ("b", 1, 1), ("c", 1, 1)], 10, [["a"], ["b", "c"]]),  # never across two stages (writers)
    ([("a", 2, 0), ("b", 2, 0)], 4, [["a", "b"]]),                 # exactly the limit fits
    ([], 4, []),
])
def test_tensors_fill_files_up_to_the_limit_and_never_span_two_stages(entries, limit, files):
    assert plan_files(entries, limit) == files


def test_file_names_follow_the_hugging_face_pattern():
    assert file_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


CONFIG = LlamaConfig(vocab_size=64, dim=32, layers=2, heads=4, kv_heads=2, max_seq_len=16)


def test_every_bundled_name_maps_to_llama_for_causal_lm_and_back_exactly():
    model = Llama(CONFIG)
    model.init_weights(torch.Generator().manual_seed(3))
    for name, tensor in model.state_dict().items():
        hf, converted = to_hf(name, tensor, CONFIG)
        assert hf == hf_name(name) and hf.startswith(("model.", "lm_head."))
        back, again = from_hf(hf, converted, CONFIG)
        assert back == name and torch.equal(again, tensor)
    assert hf_name("layers.1.attention.wq.weight") == "model.layers.1.self_attn.q_proj.weight"
    assert hf_name("layers.0.feed_forward.w1.weight") == "model.layers.0.mlp.gate_proj.weight"
    with pytest.raises(KeyError, match="'rotary.cos' is not a parameter of the bundled Llama"):
        hf_name("rotary.cos")


def test_transformers_llama_with_the_mapped_weights_gives_the_bundled_models_logits():
    transformers = pytest.importorskip("transformers")
    model = Llama(CONFIG)
    model.init_weights(torch.Generator().manual_seed(3))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(CONFIG))).eval()
    state = dict(to_hf(name, tensor, CONFIG) for name, tensor in model.state_dict().items())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert (missing, unexpected) == ([], [])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-5, rtol=0)
