"""Baseline for step_overhead.py: a hand-written plain PyTorch FSDP2 loop, no llm_runtime runtime.

Same model, data order, optimizer, batch and mixed-precision policy as `llm-runtime train`: on a
GPU, FSDP2 with bf16 parameters and fp32 reductions, or on one rank bf16 autocast over fp32
parameters; fp32 on CPU. Run under torchrun.
usage: fsdp2_baseline_worker.py DIM LAYERS HEADS SEQ BATCH STEPS WARMUP
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from llm_runtime.models import Llama, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed_loop  # noqa: E402


def main() -> None:
    dim, layers, heads, seq, batch, steps, warmup = map(int, sys.argv[1:8])
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    model = Llama(LlamaConfig(dim=dim, layers=layers, heads=heads, max_seq_len=seq))
    model.init_weights(torch.Generator().manual_seed(1234))
    model.to(device)
    cuda = device.type == "cuda"
    if dist.get_world_size() > 1:  # FSDP2, bf16 parameters and fp32 reductions on a GPU
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda
                  else MixedPrecisionPolicy())
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    # One rank: nothing to shard; bf16 autocast over fp32 parameters on a GPU (the runtime does the same)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and dist.get_world_size() == 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def train_step(inputs, targets):
        with autocast:
            logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    timed_loop(train_step, steps=steps, warmup=warmup, batch=batch, seq=seq, device=device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
