"""rt.parallelize on Hugging Face causal LMs (tiny random configs built here, nothing downloaded).

For each family in one job: Llama built eagerly with different weights on every rank
(parallelize starts all from rank 0's), Mistral and a tied-embedding Qwen2 on the meta device
(the family's seeded init). Each trains 5 steps; rank 0 also trains a plain copy through HF's own
forward (``.logits``) on the whole batch and writes both loss curves and the largest difference of
the trained weights from the copy's, or the error parallelize raised (a tied model under pipeline parallelism is refused).
usage: hf_model.py OUT_DIR
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import llm_runtime
from llm_runtime.models.hf import HFCausalLM
from side_by_side import side_by_side  # beside this script (its directory is on sys.path)

STEPS = 5
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SIZES), "eager"),
    "mistral": (MistralForCausalLM, MistralConfig(**SIZES, sliding_window=32), "meta"),
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**SIZES, tie_word_embeddings=True), "meta"),
}


def build(cls, config, init, rank, seed):
    reference = cls(config)
    if init == "meta":
        with torch.device("meta"):
            model = cls(config)
        fill = HFCausalLM(reference).init_fn(torch.Generator().manual_seed(seed))  # train.seed's draw
        with torch.no_grad():
            for name, param in HFCausalLM(reference).named_parameters():
                fill(name, param)
        return model, reference
    torch.manual_seed(100 + rank)  # different on every rank: parallelize must broadcast rank 0's
    model = cls(config)
    if rank == 0:
        reference.load_state_dict(model.state_dict())
    with torch.no_grad():  # every rank's reference is rank 0's model (each checks the stages it holds)
        for param in reference.parameters():
            dist.broadcast(param, src=0)
    return model, reference


def train(rt, cls, config, init):
    model, reference = build(cls, config, init, rt.rank, rt.config.train.seed)
    try:
        parallel = rt.parallelize(model)
    except ValueError as err:
        return {"error": str(err)}
    assert not any(p.is_meta for p in parallel.parameters())
    start = {name: p.detach().clone() for name, p in HFCausalLM(reference).named_parameters()}
    losses, ref_losses = side_by_side(rt, parallel, reference, vocab=64, steps=STEPS, lr=0.5,
                                      logits=lambda out: out.logits)
    moved = max((p.detach() - start[name]).abs().max().item() for name, p in HFCausalLM(reference).named_parameters())
    return {"parallel": losses, "reference": ref_losses, "weights_max_diff": weights_max_diff(parallel, reference),
            "weights_moved": moved}


def weights_max_diff(parallel, reference) -> float:
    """Largest difference of any trained parameter from the reference's (over every rank's stages)."""
    wanted = dict(HFCausalLM(reference).named_parameters())
    worst = torch.zeros(())
    for part in parallel.parts:
        for name, param in part.named_parameters():
            full = param.full_tensor() if hasattr(param, "full_tensor") else param  # a collective of its mesh
            worst = torch.maximum(worst, (full.detach() - wanted[name].detach()).abs().max())
    if dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def main():
    out = sys.argv[1]
    rt = llm_runtime.init()
    results = {name: train(rt, *spec) for name, spec in FAMILIES.items()}
    if rt.rank == 0:
        with open(os.path.join(out, "losses.json"), "w") as sink:
            json.dump(results, sink)
    rt.shutdown()


if __name__ == "__main__":
    main()
