"""A worker for launcher tests: init the runtime, all-reduce, write one JSON report per rank.

usage: report.py (OUT_DIR | --out OUT_DIR) [--fail-rank R] [--hang-rank R]
(``--out`` is how a SageMaker hyperparameter reaches a program.)

--hang-rank R: rank R never joins the all-reduce (it sleeps), so the others must time out.
"""
import json
import os
import socket
import sys
import traceback


def main() -> None:
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else sys.argv[1]
    fail_rank = int(sys.argv[sys.argv.index("--fail-rank") + 1]) if "--fail-rank" in sys.argv else -1
    hang_rank = int(sys.argv[sys.argv.index("--hang-rank") + 1]) if "--hang-rank" in sys.argv else -1
    report = {"rank": int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "-1")))}
    try:
        import torch
        import torch.distributed as dist

        import llm_runtime

        rt = llm_runtime.init()
        report["rank"] = rt.rank
        if rt.rank == fail_rank:
            raise SystemExit(f"injected failure on rank {rt.rank}")
        if rt.rank == hang_rank:
            import time

            time.sleep(120)  # a stuck rank: never reaches the collective
        value = torch.tensor([float(rt.rank + 1)])
        dist.all_reduce(value)
        report.update(
            world_size=rt.world_size, local_rank=rt.local_rank, sum=value.item(), kind=rt.cluster.kind,
            hostname=socket.gethostname(), current_host=rt.cluster.current_host, hosts=list(rt.cluster.hosts),
            backend=rt.backend, argv=sys.argv[1:],
            env={k: os.environ.get(k) for k in ("NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                                 "MASTER_ADDR", "LOCAL_WORLD_SIZE")},
        )
        rt.shutdown()
    except SystemExit:
        raise
    except BaseException:
        report["traceback"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(out, f"rank-{report['rank']}.json"), "w") as sink:
            json.dump(report, sink)


if __name__ == "__main__":
    main()
