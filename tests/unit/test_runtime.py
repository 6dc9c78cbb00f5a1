"""Pure pieces of the runtime: backend choice and the variables an MPI rank is given."""
import pytest

from llm_runtime.cluster import ClusterInfo
from llm_runtime.runtime import choose_backend
from llm_runtime.workerenv import process_env

MPI_RANK = ClusterInfo(kind="mpi", hosts=("h",), current_host="h", node_rank=0, num_nodes=1, nproc_per_node=4,
                       master_addr="127.0.0.1", master_port=29500, rank=3, local_rank=3, world_size=4)


@pytest.mark.parametrize("requested,cuda,expected", [
    ("auto", False, "gloo"), ("auto", True, "nccl"), ("gloo", True, "gloo"), ("nccl", True, "nccl"),
])
def test_backend_is_nccl_with_gpus_and_gloo_without(requested, cuda, expected):
    assert choose_backend(requested, cuda) == expected


def test_nccl_without_a_gpu_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="needs CUDA"):
        choose_backend("nccl", False)
    # An unknown backend never reaches choose_backend: the config refuses it (test_config.py).


def test_mpi_rank_gets_the_torch_distributed_variables():
    assert process_env(MPI_RANK) == {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_a_node_level_process_gets_no_rank_variables():
    node = ClusterInfo(kind="local", hosts=("h",), current_host="h", node_rank=0, num_nodes=1, nproc_per_node=2,
                       master_addr="127.0.0.1", master_port=29500)
    assert process_env(node) == {}


def test_plain_python_is_a_world_of_one(monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    import llm_runtime
    import torch.distributed as dist

    rt = llm_runtime.init()
    try:
        assert (rt.rank, rt.world_size, rt.backend, rt.cluster.kind) == (0, 1, "gloo", "local")
        assert dist.get_world_size() == 1
    finally:
        rt.shutdown()
    assert not dist.is_initialized()


def test_init_refuses_a_bad_user_config_before_any_process_group():
    import torch.distributed as dist

    from llm_runtime import init
    from llm_runtime.config import Config, ConfigError

    config = Config()
    config.watchdog.exchange_s = -1.0
    with pytest.raises(ConfigError, match=r"watchdog.exchange_s=-1.0 \(from the program's Config\): expects a finite number >= 0"):
        init(config)
    assert not dist.is_initialized()


def test_init_reads_a_user_programs_config_from_its_environment(monkeypatch):
    import torch.distributed as dist

    from llm_runtime import init
    from llm_runtime.config import ConfigError

    monkeypatch.setenv("LLM_RUNTIME_LAUNCH_STOP_DEADLINE_S", "-3")
    with pytest.raises(ConfigError, match="LLM_RUNTIME_LAUNCH_STOP_DEADLINE_S"):
        init()
    assert not dist.is_initialized()
