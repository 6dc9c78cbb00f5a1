"""One rank of benchmarks/checkpoint.py: the same FSDP2 state saved two ways to the same S3 server.

baseline: a synchronous DCP save to local disk, then every rank uploads its own files (training
is blocked for all of it); ours: the runtime's Checkpointer (blocked only while staging, one
upload per node, manifest last). Rank 0 also times a raw s5cmd copy of the same bytes.
usage (under torchrun): checkpoint_worker.py WORKDIR DIM LAYERS
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_runtime.checkpoint.manager import Checkpointer  # noqa: E402
from llm_runtime.checkpoint.state import TorchState  # noqa: E402
from llm_runtime.storage import open_store  # noqa: E402
from llm_runtime.config import load_config  # noqa: E402
from llm_runtime.models import Llama, LlamaConfig  # noqa: E402
from llm_runtime.parallel.tensor import llama_root_tp_plan, llama_tp_plan  # noqa: E402


class _Position:
    def state_dict(self):
        return {"step": 1}


def main() -> None:
    import llm_runtime

    work, dim, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    config = load_config(cli=[("checkpoint.uri", "s3://bench/ck"), ("checkpoint.local_dir", str(work / "ours")),
                              ("parallel.mixed_precision", "fp32")])
    rt = llm_runtime.init(config)
    model = Llama(LlamaConfig(dim=dim, layers=layers, heads=dim // 64, max_seq_len=64))
    model.init_weights(torch.Generator().manual_seed(0))
    params = model.num_parameters()
    parallel = rt.parallelize(model, tp_plan=llama_tp_plan(True), root_tp_plan=llama_root_tp_plan(True))
    optimizers = [torch.optim.AdamW(part.parameters(), lr=1e-4) for part in parallel.parts]
    rows = torch.randint(0, 256, (2, 33))
    parallel.train_step(rows[:, :-1], rows[:, 1:])
    for optimizer in optimizers:
        optimizer.step()
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in optimizers]
    state = TorchState(parallel.parts, optimizers, schedulers)
    import torch.distributed.checkpoint as dcp

    # Baseline: synchronous DCP save, then each rank uploads its own files.
    store = open_store(f"s3://bench/baseline/rank-{rt.rank}")
    dist.barrier()
    started = time.perf_counter()
    target = work / "baseline"
    dcp.save(state.dcp_state(), storage_writer=dcp.FileSystemWriter(str(target)))
    mine = [p for p in sorted(target.iterdir()) if p.name.startswith(f"__{rt.rank}_")
            or (rt.rank == 0 and p.name == ".metadata")]
    for path in mine:
        store.write_file(path.name, path)
    dist.barrier()
    baseline_blocked = time.perf_counter() - started
    baseline_counts = torch.tensor([store.stats.counts.get("PUT", 0), len(mine)])
    dist.all_reduce(baseline_counts)

    # Ours.
    checkpointer = Checkpointer(config, rank=rt.rank, world_size=rt.world_size, local_rank=rt.local_rank,
                                node_rank=0, num_nodes=1, backend="fsdp",
                                local_dir=rt.paths.checkpoint_dir)
    dist.barrier()
    report = checkpointer.save(1, state, _Position())
    blocked = torch.tensor([report.blocked_s])
    dist.all_reduce(blocked, op=dist.ReduceOp.MAX)
    checkpointer.wait()
    puts = torch.tensor([checkpointer.store.stats.counts.get("PUT", 0)])
    dist.all_reduce(puts)
    checkpointer.close()

    if rt.rank == 0:
        # Raw s5cmd: the same bytes (this node's files), one copy.
        node_dir = next((work / "ours").glob("run-*/node-00000/step-000000001"))
        total = sum(p.stat().st_size for p in node_dir.rglob("*") if p.is_file())
        from llm_runtime.checkpoint.layout import step_of_key

        objects = sum(1 for key, *_ in open_store(f"s3://bench/ck/{checkpointer.run_id}").list()
                      if step_of_key(key) == 1)  # the tars lie under the spread prefixes, sK/step-N/
        binary = Path(sys.executable).with_name("s5cmd")
        started = time.perf_counter()
        subprocess.run([str(binary), "--endpoint-url", os.environ["AWS_ENDPOINT_URL_S3"], "cp", f"{node_dir}/*",
                        "s3://bench/raw/"], check=True, capture_output=True, timeout=900)
        raw_s = time.perf_counter() - started
        print("CHECKPOINT_RESULT " + json.dumps({
            "params": params, "state_bytes": report.bytes, "ranks": rt.world_size,
            "baseline_blocked_s": baseline_blocked, "blocked_s": float(blocked.item()), "upload_s": report.upload_s,
            "baseline_puts": int(baseline_counts[0]), "baseline_objects": int(baseline_counts[1]),
            "puts": int(puts.item()), "objects": objects, "raw_s5cmd_s": raw_s,
            "raw_bytes": total}), flush=True)
    rt.shutdown()


if __name__ == "__main__":
    main()
