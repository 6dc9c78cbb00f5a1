"""Baseline for step_overhead.py's DeepSpeed row: a hand-written deepspeed.initialize loop.

Same model, data order, optimizer (torch AdamW) and ZeRO stage as `llm-runtime train
--parallel.backend=deepspeed`; run under torchrun.
usage: deepspeed_baseline_worker.py DIM LAYERS HEADS SEQ BATCH STEPS WARMUP STAGE
"""
import os
import sys
import time

import torch

from llm_runtime.models import ByteTokenizer, Llama, LlamaConfig, bundled_text
from llm_runtime.train import global_batch_starts


def main() -> None:
    dim, layers, heads, seq, batch, steps, warmup, stage = map(int, sys.argv[1:9])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = Llama(LlamaConfig(dim=dim, layers=layers, heads=heads, max_seq_len=seq))
    model.init_weights(torch.Generator().manual_seed(1234))
    config = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch // world,
              "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "bf16": {"enabled": torch.cuda.is_available()},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                        "torch_adam": True}},
              "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    tokens = torch.from_numpy(ByteTokenizer().encode_array(bundled_text()).astype("int64"))
    offsets = torch.arange(seq + 1)
    per_rank = batch // world
    for step in range(1, steps + 1):
        if step == warmup + 1:
            dist.barrier()
            start = time.perf_counter()
        starts = torch.from_numpy(global_batch_starts(1234, step, batch, len(tokens), seq))
        rows = tokens[starts[rank * per_rank:(rank + 1) * per_rank, None] + offsets].to(engine.device)
        logits = engine(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        if step % 10 == 0:
            reported = loss.detach().clone()
            dist.all_reduce(reported)
    dist.barrier()
    if rank == 0:
        print(f"STEPS_PER_S {(steps - warmup) / (time.perf_counter() - start):.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
