"""The single-process run that every parallel layout (torch's and DeepSpeed's) must match, made once."""
import pytest
import torch

from tests.distributed.test_parallel_equivalence import train


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory):
    """The single-process run every layout must match (DeepSpeed's too): metrics, weights, log."""
    result = train(tmp_path_factory.mktemp("single"), 1, [])
    # The exported weights are the trained ones, not the initial ones (else the comparison is empty).
    from llm_runtime.models import Llama, LlamaConfig

    from tests.exported import as_bundled

    config = LlamaConfig(dim=64, layers=4, heads=4, max_seq_len=32)
    initial = Llama(config)
    initial.init_weights(torch.Generator().manual_seed(1234))
    trained = as_bundled(result[1], config)
    assert trained.keys() == initial.state_dict().keys()
    moved = max((trained[k] - v).abs().max().item() for k, v in initial.state_dict().items())
    assert moved > 1e-3, f"exported weights moved only {moved:.1e} from their initial values"
    return result
