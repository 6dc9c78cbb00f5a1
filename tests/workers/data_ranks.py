"""A worker for data tests: init the runtime, read a few batches, report their sample ids.

usage: data_ranks.py OUT_DIR STEPS   (the job's config comes from LLM_RUNTIME_* variables)
"""
import json
import os
import sys
import traceback


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    report = {"rank": int(os.environ.get("RANK", "-1"))}
    try:
        import llm_runtime
        from llm_runtime.data.build import build_loader
        from tests.datasets import sample_ids

        rt = llm_runtime.init()
        with build_loader(rt.config, rt.dims, dp_rank=rt.dp_rank, local_rank=rt.local_rank) as loader:
            batches = [sample_ids(loader.next_batch().numpy()) for _ in range(steps)]
            report.update(dp_rank=rt.dp_rank, coords=rt.dims.coords(rt.rank), batches=batches,
                          stats=loader.stats(), state=loader.state_dict())
        rt.shutdown()
    except BaseException:
        report["traceback"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(out, f"rank-{report['rank']}.json"), "w") as sink:
            json.dump(report, sink)


if __name__ == "__main__":
    main()
