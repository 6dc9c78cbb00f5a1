"""Worker for launch_overhead.py: init the runtime, run one training step, report when it ended."""
import sys
import time

import torch

import llm_runtime
from llm_runtime.models import Llama, LlamaConfig


def main() -> None:
    rt = llm_runtime.init()
    model = Llama(LlamaConfig(dim=64, layers=2, heads=4, max_seq_len=64))
    model = torch.nn.parallel.DistributedDataParallel(model) if rt.world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    torch.distributed.barrier()
    if rt.is_main:
        print(f"FIRST_STEP_DONE {time.time():.6f}", flush=True)
    rt.shutdown()


if __name__ == "__main__":
    sys.exit(main())
