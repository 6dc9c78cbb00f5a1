"""Launch plans: what a host decides to run, as a value (llm_runtime.launch). Nothing is started."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from llm_runtime.cluster import ClusterInfo, InstanceGroup, detect
from llm_runtime.launch import (LaunchError, Target, mpi_export_names, mpi_status_port, mpirun_argv,
                                plan_launch, sagemaker_target)

PY = "/opt/venv/bin/python"
TARGET = Target(module="llm_runtime", args=("train", "--train.steps=5"))
SCRIPT = Target(script="job.py", args=("--epochs", "2"))

LOCAL = ClusterInfo(kind="local", hosts=("box",), current_host="box", node_rank=0, num_nodes=1,
                    nproc_per_node=2, master_addr="127.0.0.1", master_port=29500)
SM_NODE0 = ClusterInfo(kind="sagemaker", hosts=("algo-1", "algo-2"), current_host="algo-1", node_rank=0,
                       num_nodes=2, nproc_per_node=8, master_addr="algo-1", master_port=7777,
                       network_interface="ens5", instance_type="ml.p4d.24xlarge")
SM_NODE1 = replace(SM_NODE0, current_host="algo-2", node_rank=1)
WORKER = replace(SM_NODE1, rank=9, local_rank=1, world_size=16)
TORCHRUN_WORKER = replace(LOCAL, kind="torchrun", rank=1, local_rank=1, world_size=2)
MPI_WORKER = replace(LOCAL, kind="mpi", rank=0, local_rank=0, world_size=2)
GROUPS = (InstanceGroup("gpu", "ml.p4d.24xlarge", ("algo-1", "algo-2")),
          InstanceGroup("data", "ml.c5.2xlarge", ("algo-3",)))
OUTSIDER = replace(SM_NODE0, current_host="algo-3", node_rank=-1, instance_groups=GROUPS, current_group="data")


def value_after(argv, flag: str) -> str:
    """The argument that follows ``flag`` (exactly once) in argv."""
    argv = list(argv)
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def exported_names(argv) -> list[str]:
    argv = list(argv)
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]


def mca(argv, name: str) -> str:
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "-mca" and argv[i + 1] == name:
            return argv[i + 2]
    raise AssertionError(f"-mca {name} not in {argv}")


# ------------------------------------------------------------------ workers and local


@pytest.mark.parametrize("info", [WORKER, TORCHRUN_WORKER, MPI_WORKER], ids=["sagemaker", "torchrun", "mpi"])
@pytest.mark.parametrize("mpi", [False, True])
def test_already_started_worker_runs_the_target_itself(info, mpi):
    plan = plan_launch(info, TARGET, mpi=mpi, python=PY)
    assert plan.action == "exec"
    assert list(plan.argv) == [PY, "-m", "llm_runtime", "train", "--train.steps=5"]


def test_script_target_runs_the_script_with_its_arguments():
    plan = plan_launch(TORCHRUN_WORKER, SCRIPT, python=PY)
    assert list(plan.argv) == [PY, "job.py", "--epochs", "2"]


@pytest.mark.parametrize("kwargs", [{}, {"module": "a", "script": "b.py"}])
def test_target_needs_exactly_one_of_module_or_script(kwargs):
    with pytest.raises(LaunchError):
        Target(**kwargs)


def test_local_machine_uses_standalone_torchrun():
    plan = plan_launch(LOCAL, TARGET, python=PY)
    assert plan.action == "torchrun"
    argv = list(plan.argv)
    assert "--standalone" in argv
    assert value_after(argv, "--nnodes") == "1"
    assert value_after(argv, "--nproc-per-node") == "2"
    assert "--master-addr" not in argv and "--node-rank" not in argv
    assert argv[-4:] == ["-m", "llm_runtime", "train", "--train.steps=5"]
    assert plan.env == {}


# ------------------------------------------------------------------ torchrun on several hosts

TORCHRUN_CASES = [
    # (id, info, nproc, max_restarts, expected nproc)
    ("node0-defaults", SM_NODE0, 0, 0, "8"),
    ("node1-explicit-nproc", SM_NODE1, 4, 0, "4"),
    ("node1-restarts", SM_NODE1, 0, 3, "8"),
]


@pytest.mark.parametrize("info, nproc, restarts, expected_nproc", [c[1:] for c in TORCHRUN_CASES],
                         ids=[c[0] for c in TORCHRUN_CASES])
def test_sagemaker_two_hosts_get_multinode_torchrun_argv(info, nproc, restarts, expected_nproc):
    plan = plan_launch(info, TARGET, nproc=nproc, max_restarts=restarts, python=PY)
    assert plan.action == "torchrun"
    argv = list(plan.argv)
    assert "--standalone" not in argv
    assert value_after(argv, "--nnodes") == "2"
    assert value_after(argv, "--node-rank") == str(info.node_rank)
    assert value_after(argv, "--master-addr") == "algo-1"
    assert value_after(argv, "--master-port") == "7777"
    assert value_after(argv, "--nproc-per-node") == expected_nproc
    assert value_after(argv, "--max-restarts") == str(restarts)
    assert argv[-4:] == list(TARGET.entry())


@pytest.mark.parametrize("restarts, env", [(0, {}), (1, {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}),
                                           (5, {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})])
def test_restarts_disable_the_shared_rendezvous_store(restarts, env):
    for info in (LOCAL, SM_NODE0):
        assert dict(plan_launch(info, TARGET, max_restarts=restarts).env) == env


def test_the_second_sagemaker_host_runs_torchrun_with_exactly_this_command_line():
    plan = plan_launch(SM_NODE1, TARGET, max_restarts=2, python=PY)
    assert plan.argv == ("--nnodes", "2", "--node-rank", "1", "--master-addr", "algo-1", "--master-port", "7777",
                         "--nproc-per-node", "8", "--max-restarts", "2", "--monitor-interval", "0.1",
                         "-m", "llm_runtime", "train", "--train.steps=5")
    # ... and torchrun's own parser reads it as meant.
    from torch.distributed.run import parse_args

    args = parse_args(list(plan.argv))
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == ("2", 1, "algo-1", 7777)
    assert (args.nproc_per_node, args.max_restarts, args.module) == ("8", 2, True)
    assert [args.training_script, *args.training_script_args] == ["llm_runtime", "train", "--train.steps=5"]


def test_sagemaker_node_detected_from_tree_plans_its_torchrun(sagemaker_tree):
    info = detect({}, sagemaker_tree(["algo-2", "algo-10", "algo-1"], "algo-1"), num_gpus=4)
    argv = list(plan_launch(info, TARGET).argv)
    assert value_after(argv, "--nnodes") == "3"
    assert value_after(argv, "--node-rank") == "2"
    assert value_after(argv, "--master-addr") == "algo-2"
    assert value_after(argv, "--nproc-per-node") == "4"


BAD_OPTION_CASES = [
    # (id, info, nproc, max_restarts, text in the message)
    ("negative-nproc", SM_NODE0, -1, 0, "nproc"),
    ("zero-workers-known", replace(SM_NODE0, nproc_per_node=0), 0, 0, "nproc"),
    # A negative launch.max_restarts is the config's to refuse (tests/unit/test_cli.py).
]


@pytest.mark.parametrize("info, nproc, restarts, text", [c[1:] for c in BAD_OPTION_CASES],
                         ids=[c[0] for c in BAD_OPTION_CASES])
def test_bad_launch_options_are_rejected(info, nproc, restarts, text):
    with pytest.raises(LaunchError, match=text):
        plan_launch(info, TARGET, nproc=nproc, max_restarts=restarts)


# ------------------------------------------------------------------ MPI


SECRET_ENV = {
    "PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRET",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEBkaDTOKENVALUE", "AWS_REGION": "us-west-2",
    "NCCL_DEBUG": "INFO", "HOME": "/root", "SM_CURRENT_HOST": "algo-1", "MASTER_ADDR": "10.0.0.9",
    "WANDB_MODE": "offline", "WANDB_API_KEY": "wandbkeyVALUE0123456789", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    "TRAINING_JOB_NAME": "job-1",
}


def test_mpi_first_host_runs_mpirun_over_every_host():
    exports = mpi_export_names(SECRET_ENV, ["FI_PROVIDER", "NCCL_SOCKET_IFNAME"])
    plan = plan_launch(SM_NODE0, TARGET, mpi=True, nproc=4, env_exports=exports, python=PY)
    assert plan.action == "mpirun"
    argv = list(plan.argv)
    assert value_after(argv, "--host") == "algo-1:4,algo-2:4"
    assert value_after(argv, "-np") == "8"
    assert mca(argv, "btl_tcp_if_include") == "ens5"
    names = exported_names(argv)
    for name in exports:
        assert name in names
    assert "MASTER_ADDR=algo-1" in names
    assert argv[-5:] == [PY, "-m", "llm_runtime", "train", "--train.steps=5"]


def test_mpirun_argv_never_carries_a_secret_value():
    exports = mpi_export_names(SECRET_ENV, [])
    argv = mpirun_argv(SM_NODE0, TARGET, nproc=8, export=exports, python=PY)
    joined = " ".join(argv)
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY"):
        assert SECRET_ENV[secret] not in joined
        assert secret in exported_names(argv)  # forwarded by name: mpirun reads the value itself
    assert all("=" not in name for name in exported_names(argv) if not name.startswith("MASTER_ADDR="))


def test_mpi_export_names_are_names_only_and_skip_unrelated_variables():
    names = mpi_export_names(SECRET_ENV, ["FI_PROVIDER"])
    assert names == sorted(names)
    assert {"PATH", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "NCCL_DEBUG",
            "SM_CURRENT_HOST", "FI_PROVIDER"} <= set(names)
    # the trackers' variables reach rank 0 wherever mpirun places it
    assert {"WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "TRAINING_JOB_NAME"} <= set(names)
    assert "HOME" not in names
    assert "MASTER_ADDR" not in names  # mpirun sets it to the first host explicitly
    assert not set(SECRET_ENV.values()) & set(names)


@pytest.mark.parametrize("info, iface", [(SM_NODE0, "ens5"), (replace(SM_NODE0, network_interface=None), "eth0")])
def test_mpirun_pins_tcp_to_the_network_interface(info, iface):
    argv = mpirun_argv(info, TARGET, nproc=1, export=[], python=PY)
    assert mca(argv, "btl_tcp_if_include") == iface
    assert mca(argv, "oob_tcp_if_include") == iface


def test_mpirun_without_known_hosts_is_an_error():
    with pytest.raises(LaunchError, match="hosts"):
        mpirun_argv(replace(LOCAL, hosts=()), TARGET, nproc=2, export=[])


@pytest.mark.parametrize("info", [SM_NODE1, replace(SM_NODE0, hosts=("algo-1", "algo-2", "algo-3"), num_nodes=3,
                                                    current_host="algo-3", node_rank=2, master_port=29400)],
                         ids=["second-of-two", "third-of-three"])
def test_mpi_other_hosts_wait_for_the_first_hosts_mpirun(info):
    plan = plan_launch(info, TARGET, mpi=True)
    assert plan.action == "mpi-wait"
    assert plan.argv == ()
    assert plan.wait_addr == "algo-1"
    assert plan.wait_port == info.master_port + 1 == mpi_status_port(info)


# ------------------------------------------------------------------ heterogeneous clusters


@pytest.mark.parametrize("mpi", [False, True])
def test_host_outside_distribution_groups_idles(mpi):
    plan = plan_launch(OUTSIDER, TARGET, mpi=mpi)
    assert plan.action == "idle"
    assert plan.argv == ()
    assert "algo-3" in plan.message and "data" in plan.message


def test_host_outside_distribution_groups_runs_its_group_command():
    plan = plan_launch(OUTSIDER, TARGET, group_commands={"data": "python serve_data.py --port 9000",
                                                         "gpu": "never"})
    assert plan.action == "group-command"
    assert list(plan.argv) == ["python", "serve_data.py", "--port", "9000"]


def test_group_command_of_another_group_leaves_the_host_idle():
    assert plan_launch(OUTSIDER, TARGET, group_commands={"gpu": "echo hi"}).action == "idle"


def test_training_host_ignores_group_commands():
    plan = plan_launch(SM_NODE0, TARGET, group_commands={"gpu": "echo hi"})
    assert plan.action == "torchrun"


def test_outsider_detected_from_heterogeneous_tree_idles(sagemaker_tree):
    root = sagemaker_tree(None, "algo-3", groups={"gpu": ("ml.p4d.24xlarge", ["algo-1", "algo-2"]),
                                                  "data": ("ml.c5.2xlarge", ["algo-3"])},
                          hyperparameters={"sagemaker_distribution_instance_groups": ["gpu"]})
    info = detect({}, root)
    assert plan_launch(info, TARGET).action == "idle"
    assert plan_launch(info, TARGET, group_commands={"data": "true"}).action == "group-command"


# ------------------------------------------------------------------ the SageMaker program


def test_sagemaker_program_resolves_under_code_dir_and_passes_hyperparameters(sagemaker_tree):
    root = sagemaker_tree(["algo-1"], "algo-1", code_files=["train.py"])
    hyper = {"sagemaker_program": "train.py", "sagemaker_region": "us-west-2",
             "epochs": 3, "lr": 0.5, "name": "run a", "flag": True, "layers": [1, 2], "opts": {"a": 1}}
    target = sagemaker_target(hyper, {}, root / "code")
    assert target.script == str(root / "code" / "train.py")
    args = list(target.args)
    assert args == ["--epochs", "3", "--lr", "0.5", "--name", "run a", "--flag", "true",
                    "--layers", "[1, 2]", "--opts", json.dumps({"a": 1})]
    assert not any(a.startswith("--sagemaker_") for a in args)


def test_sagemaker_program_from_the_hyperparameters_file(sagemaker_tree):
    from llm_runtime.cluster import sagemaker as sm

    root = sagemaker_tree(["algo-1"], "algo-1", code_files=["train.py"],
                          raw_hyperparameters={"sagemaker_program": '"train.py"', "train.steps": "5"})
    target = sagemaker_target(sm.read_hyperparameters({}, root), {}, root / "code")
    assert target.script == str(root / "code" / "train.py")
    assert list(target.args) == ["--train.steps", "5"]


def test_sagemaker_program_variable_is_used_without_the_hyperparameter(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "entry.py").write_text("")
    target = sagemaker_target({"epochs": 1}, {"SAGEMAKER_PROGRAM": "entry.py"}, code)
    assert target.script == str(code / "entry.py")
    assert list(target.args) == ["--epochs", "1"]


def test_sagemaker_program_that_does_not_exist_is_refused_before_any_worker_starts(tmp_path):
    with pytest.raises(LaunchError, match=r"elsewhere/job.py.*not in"):
        sagemaker_target({"sagemaker_program": "elsewhere/job.py"}, {}, tmp_path)


def test_missing_program_with_an_s3_submit_directory_says_it_is_not_downloaded(tmp_path):
    with pytest.raises(LaunchError, match="does not download sagemaker_submit_directory"):
        sagemaker_target({"sagemaker_program": "job.py", "sagemaker_submit_directory": "s3://b/src.tar.gz"},
                         {}, tmp_path)


def test_local_submit_directory_is_where_the_program_is_found(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "job.py").write_text("")
    target = sagemaker_target({"sagemaker_program": "job.py", "sagemaker_submit_directory": str(source)},
                              {}, tmp_path / "code")
    assert target.script == str(source / "job.py")


@pytest.mark.parametrize("program", ["train.sh", "train", "job.ipynb"])
def test_sagemaker_program_that_is_not_python_is_rejected(program, tmp_path):
    with pytest.raises(LaunchError, match=program):
        sagemaker_target({"sagemaker_program": program}, {}, tmp_path)


@pytest.mark.parametrize("hyper, environ", [({}, {}), ({"epochs": 3, "sagemaker_region": "x"}, {"OTHER": "1"})])
def test_no_sagemaker_program_means_no_target(hyper, environ, tmp_path):
    assert sagemaker_target(hyper, environ, tmp_path) is None
