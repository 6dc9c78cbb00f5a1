"""Baseline for step_overhead.py's DeepSpeed row: a hand-written deepspeed.initialize loop.

Same model, data order, optimizer (torch AdamW) and ZeRO stage as `llm-runtime train
--parallel.backend=deepspeed`; run under torchrun.
usage: deepspeed_baseline_worker.py DIM LAYERS HEADS SEQ BATCH STEPS WARMUP STAGE
"""
import os
import sys
from pathlib import Path

import torch

from llm_runtime.models import Llama, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed_loop  # noqa: E402


def main() -> None:
    dim, layers, heads, seq, batch, steps, warmup, stage = map(int, sys.argv[1:9])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    model = Llama(LlamaConfig(dim=dim, layers=layers, heads=heads, max_seq_len=seq))
    model.init_weights(torch.Generator().manual_seed(1234))
    config = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch // dist.get_world_size(),
              "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "bf16": {"enabled": torch.cuda.is_available()},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                        "torch_adam": True}},
              "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())

    def train_step(inputs, targets):
        logits = engine(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        engine.backward(loss)
        engine.step()
        return loss

    timed_loop(train_step, steps=steps, warmup=warmup, batch=batch, seq=seq, device=engine.device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
