"""Reading what the final export wrote (train.model_dir, Hugging Face format) in tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def exported(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the export, by its (HF) name, read through the index; checks the index is exact."""
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        part = load_file(directory / file)
        assert not state.keys() & part.keys(), f"{file} repeats {sorted(state.keys() & part.keys())}"
        assert {n for n, f in index["weight_map"].items() if f == file} == part.keys(), file
        state.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    return state


def as_bundled(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An exported LlamaForCausalLM state as the bundled Llama's state dict."""
    from llm_runtime.models.llama_hf import from_hf

    return dict(from_hf(name, tensor, config) for name, tensor in state.items())
