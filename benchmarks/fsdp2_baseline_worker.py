"""Baseline for step_overhead.py: a hand-written plain PyTorch FSDP2 loop, no llm_runtime runtime.

Same model, data order, optimizer and batch as `llm-runtime train`; run under torchrun.
usage: fsdp2_baseline_worker.py DIM LAYERS HEADS SEQ BATCH STEPS WARMUP
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

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
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def train_step(inputs, targets):
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
