"""rt.parallelize on transformers causal LMs: Llama, Mistral and a tied-embedding Qwen2, each job
running every family (tests/workers/hf_model.py) against HF's own forward in one process."""
import json
import math

import pytest

from tests.procs import BIN, REPO, clean_env, run

WORKER = str(REPO / "tests" / "workers" / "hf_model.py")
FAMILIES = ("llama", "mistral", "qwen2-tied")


@pytest.mark.parametrize("layout, nproc", [
    ({"LLM_RUNTIME_PARALLEL_DP_SHARD": "2", "LLM_RUNTIME_PARALLEL_TP": "2"}, 4),  # FSDP2 and TP together
    ({"LLM_RUNTIME_PARALLEL_DP_SHARD": "2"}, 2),
    ({"LLM_RUNTIME_PARALLEL_PP": "2"}, 2),
], ids=["fsdp2xtp2", "fsdp2", "pp2"])
def test_hf_causal_lms_train_under_parallelize_like_hfs_own_forward(layout, nproc, tmp_path):
    run([str(BIN / "llm-runtime"), "launch", "--nproc-per-node", str(nproc), WORKER, str(tmp_path)],
        env=clean_env(**layout), timeout=240)
    results = json.loads((tmp_path / "losses.json").read_text())
    assert set(results) == set(FAMILIES)
    for family in FAMILIES:
        result = results[family]
        if family == "qwen2-tied" and "LLM_RUNTIME_PARALLEL_PP" in layout:
            assert "tie_word_embeddings=true" in result["error"] and "parallel.pp=2" in result["error"]
            continue
        assert len(result["parallel"]) == 5, (family, result)
        for got, want in zip(result["parallel"], result["reference"]):
            assert math.isclose(got, want, rel_tol=1e-4), (family, result)
        assert result["parallel"][-1] < result["parallel"][0], family
        assert result["weights_moved"] > 1e-3 and result["weights_max_diff"] < 1e-4, (family, result)
