"""Worker for model_memory.py: one rank's host memory while rt.parallelize sets the model up.

usage (under llm-runtime launch): model_memory_worker.py eager|meta DIM LAYERS HEADS [step]
Prints one line per rank: MEMORY {"rank", "baseline_gb", "peak_over_gb", "shard_gb"}; with ``step``
also one AdamW training step (gradients and optimizer state allocated), then STEPPED {"rank"}. The baseline
is this process's RSS after imports and the process group; the peak is VmHWM after resetting it
there (Linux /proc/self/clear_refs), so it covers the whole setup: build, layout, materialisation.
"""
import gc
import json
import sys

import torch

import llm_runtime
from llm_runtime.models import Llama, LlamaConfig
from llm_runtime.parallel.tensor import llama_root_tp_plan, llama_tp_plan


def status_gb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / (1 << 20)
    raise KeyError(field)


def main() -> None:
    mode, dim, layers, heads = sys.argv[1], *map(int, sys.argv[2:5])
    rt = llm_runtime.init()
    config = LlamaConfig(dim=dim, layers=layers, heads=heads, max_seq_len=64)
    gc.collect()
    baseline = status_gb("VmRSS")
    with open("/proc/self/clear_refs", "w") as sink:
        sink.write("5")  # VmHWM := VmRSS: the peak from here on is the setup's
    seed = torch.Generator().manual_seed(1234)
    if mode == "meta":
        with torch.device("meta"):
            model = Llama(config)
        options = {"init_fn": model.init_fn(seed)}
    else:  # the way every rank built the model before: in full, then broadcast and sharded
        model = Llama(config)
        model.init_weights(seed)
        options = {}
    parallel = rt.parallelize(model, tp_plan=llama_tp_plan(), root_tp_plan=llama_root_tp_plan(), **options)
    del model
    gc.collect()
    peak = status_gb("VmHWM")
    shard = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in parallel.parameters()) * 4
    print("MEMORY " + json.dumps({"rank": rt.rank, "baseline_gb": baseline, "peak_over_gb": peak - baseline,
                                  "shard_gb": shard / (1 << 30)}), flush=True)
    if sys.argv[5:6] == ["step"]:
        optimizer = torch.optim.AdamW(list(parallel.parameters()), lr=1e-4)
        tokens = torch.randint(0, config.vocab_size, (1, 65), generator=torch.Generator().manual_seed(rt.rank))
        parallel.train_step(tokens[:, :-1], tokens[:, 1:])
        optimizer.step()
        print("STEPPED " + json.dumps({"rank": rt.rank}), flush=True)
    rt.shutdown()


if __name__ == "__main__":
    main()
