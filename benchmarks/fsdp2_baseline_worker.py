"""Baseline for step_overhead.py: a hand-written plain PyTorch FSDP2 loop, no llm_runtime runtime.

Same model, data order, optimizer and batch as `llm-runtime train`; run under torchrun.
usage: fsdp2_baseline_worker.py DIM LAYERS HEADS SEQ BATCH STEPS WARMUP
"""
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from llm_runtime.models import ByteTokenizer, Llama, LlamaConfig, bundled_text
from llm_runtime.train import global_batch_starts


def main() -> None:
    dim, layers, heads, seq, batch, steps, warmup = map(int, sys.argv[1:8])
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    model = Llama(LlamaConfig(dim=dim, layers=layers, heads=heads, max_seq_len=seq))
    model.init_weights(torch.Generator().manual_seed(1234))
    model.to(device)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.from_numpy(ByteTokenizer().encode_array(bundled_text()).astype("int64"))
    offsets = torch.arange(seq + 1)
    per_rank = batch // world
    for step in range(1, steps + 1):
        if step == warmup + 1:
            dist.barrier()
            start = time.perf_counter()
        starts = torch.from_numpy(global_batch_starts(1234, step, batch, len(tokens), seq))
        rows = tokens[starts[rank * per_rank:(rank + 1) * per_rank, None] + offsets].to(device)
        logits = model(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            reported = loss.detach().clone()
            dist.all_reduce(reported)  # the trainer logs a global loss at the same cadence
    dist.barrier()
    if rank == 0:
        print(f"STEPS_PER_S {(steps - warmup) / (time.perf_counter() - start):.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
