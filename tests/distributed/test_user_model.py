"""rt.parallelize on a user's own model (own TP plan, own first/last-stage modules)."""
import json
import math

import pytest

from tests.procs import BIN, REPO, clean_env, run

WORKER = str(REPO / "tests" / "workers" / "user_model.py")


@pytest.mark.parametrize("layout, nproc", [
    ({"LLM_RUNTIME_PARALLEL_TP": "2"}, 2),
    ({"LLM_RUNTIME_PARALLEL_PP": "2", "LLM_RUNTIME_PARALLEL_PP_SCHEDULE": "gpipe"}, 2),
    ({"LLM_RUNTIME_PARALLEL_DP_SHARD": "2", "LLM_RUNTIME_PARALLEL_TP": "2"}, 4),
    ({"LLM_RUNTIME_PARALLEL_DP_REPLICATE": "2", "LLM_RUNTIME_PARALLEL_DP_SHARD": "2"}, 4),
    ({"LLM_RUNTIME_PARALLEL_DP_SHARD": "2", "LLM_RUNTIME_PARALLEL_TP": "2", "USER_MODEL_INIT": "meta"}, 4),
    ({"LLM_RUNTIME_PARALLEL_PP": "2", "USER_MODEL_INIT": "meta"}, 2),
], ids=["tp2", "pp2", "fsdp2xtp2", "hsdp2x2", "meta-fsdp2xtp2", "meta-pp2"])
def test_user_model_built_differently_per_rank_trains_like_rank_0s_unparallelized_copy(layout, nproc, tmp_path):
    """Eager: each rank builds its own weights and parallelize starts every rank from rank 0's.
    meta: built on the meta device; the init_fn's per-name draw gives the reference's weights."""
    run([str(BIN / "llm-runtime"), "launch", "--nproc-per-node", str(nproc), WORKER, str(tmp_path)],
        env=clean_env(**layout), timeout=180)
    result = json.loads((tmp_path / "losses.json").read_text())
    assert len(result["parallel"]) == 3
    for got, want in zip(result["parallel"], result["reference"]):
        assert math.isclose(got, want, rel_tol=1e-4), result
    assert result["parallel"][-1] < result["parallel"][0]
