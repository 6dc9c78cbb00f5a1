"""Cluster detection: which kind wins, and what each kind reports (llm_runtime.cluster.detect).

Pure: env is a plain dict, SageMaker trees live under tmp_path, no process is started.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest

from llm_runtime.cluster import ClusterError, ClusterInfo, detect

TWO_HOSTS = ["algo-1", "algo-2"]
TORCHRUN_VARS = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
ELASTIC_VARS = {**TORCHRUN_VARS, "TORCHELASTIC_RUN_ID": "job-1", "GROUP_RANK": "1"}
OMPI_VARS = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
             "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
PMI_VARS = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
SM_VARS = {"SM_HOSTS": '["algo-1","algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "4"}


def run_detect(env, root, **kwargs) -> ClusterInfo:
    """detect() that also proves the env mapping it was given is left as it was."""
    before = copy.deepcopy(env)
    info = detect(env, root, **kwargs)
    assert env == before, "detect() mutated the env it was given"
    return info


# ------------------------------------------------------------------ detection order

ORDER_CASES = [
    # (id, env, with a SageMaker tree, expected kind)
    ("nothing-set-is-local", {}, False, "local"),
    ("sagemaker-tree-is-sagemaker", {}, True, "sagemaker"),
    ("sm-hosts-variables-are-sagemaker", SM_VARS, False, "sagemaker"),
    ("four-torchrun-vars-are-torchrun", TORCHRUN_VARS, False, "torchrun"),
    ("elastic-run-id-is-torchrun", ELASTIC_VARS, False, "torchrun"),
    ("elastic-run-id-beats-mpi", {**ELASTIC_VARS, **OMPI_VARS, "RANK": "1", "WORLD_SIZE": "2"}, False,
     "torchrun"),
    ("ompi-is-mpi", OMPI_VARS, False, "mpi"),
    ("pmi-is-mpi", PMI_VARS, False, "mpi"),
    ("mpi-beats-sagemaker", OMPI_VARS, True, "mpi"),
    ("lone-master-addr-is-local", {"MASTER_ADDR": "10.9.9.9"}, False, "local"),
    ("lone-master-addr-on-sagemaker-is-sagemaker", {"MASTER_ADDR": "10.9.9.9"}, True, "sagemaker"),
    ("three-of-four-torchrun-vars-is-local",
     {"RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}, False, "local"),
]


@pytest.mark.parametrize("env, with_tree, kind", [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES])
def test_detection_order_picks_the_expected_cluster_kind(env, with_tree, kind, sagemaker_tree, empty_dir):
    root = sagemaker_tree(TWO_HOSTS, "algo-1") if with_tree else empty_dir
    assert run_detect(dict(env), root).kind == kind


def test_torchrun_worker_on_sagemaker_host_keeps_sagemaker_node_facts(sagemaker_tree):
    root = sagemaker_tree(TWO_HOSTS, "algo-2", network_interface="ens5", instance_type="ml.p4d.24xlarge")
    env = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16",
           "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1", "MASTER_ADDR": "algo-1", "MASTER_PORT": "7777"}
    info = run_detect(env, root, num_gpus=8)
    assert info.kind == "sagemaker"
    assert info.hosts == ("algo-1", "algo-2")
    assert info.instance_type == "ml.p4d.24xlarge"
    assert info.network_interface == "ens5"
    assert (info.rank, info.local_rank, info.world_size) == (9, 1, 16)
    assert info.node_rank == 1 and info.nproc_per_node == 8
    assert info.is_worker


def test_torchrun_worker_without_sagemaker_reports_its_ranks(empty_dir):
    info = run_detect(dict(TORCHRUN_VARS), empty_dir, hostname="box")
    assert info.kind == "torchrun"
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert (info.node_rank, info.num_nodes, info.nproc_per_node) == (1, 2, 2)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29400)
    assert info.is_worker and info.current_host == "box"


# ------------------------------------------------------------------ MPI


def test_mpi_rank_reports_its_ranks_from_open_mpi_variables(empty_dir):
    info = run_detect(dict(OMPI_VARS), empty_dir)
    assert info.kind == "mpi"
    assert (info.rank, info.local_rank, info.world_size, info.nproc_per_node) == (1, 1, 2, 2)
    assert info.is_worker


@pytest.mark.parametrize("extra", [
    pytest.param({"RANK": "0"}, id="rank-only"),
    pytest.param({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"},
                 id="all-four-torchrun-vars"),
    pytest.param({"WORLD_SIZE": "8"}, id="world-size"),
])
def test_mpi_rank_disagreeing_with_rank_variables_is_an_error(extra, empty_dir):
    with pytest.raises(ClusterError, match=r"RANK|WORLD_SIZE"):
        run_detect({**OMPI_VARS, **extra}, empty_dir)


def test_mpi_rank_agreeing_with_rank_variable_is_fine(empty_dir):
    info = run_detect({**OMPI_VARS, "RANK": "1", "WORLD_SIZE": "2"}, empty_dir)
    assert info.kind == "mpi" and info.rank == 1


MULTI_HOST_OMPI = {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16",
                   "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
MASTER_CASES = [
    # (id, env, hosts of a SageMaker tree or None, expected master_addr)
    ("first-sagemaker-host", MULTI_HOST_OMPI, ["algo-2", "algo-1"], "algo-2"),
    ("single-node-is-loopback", OMPI_VARS, None, "127.0.0.1"),
    ("multi-host-uses-master-addr", {**MULTI_HOST_OMPI, "MASTER_ADDR": "10.1.2.3"}, None, "10.1.2.3"),
    ("sagemaker-host-beats-master-addr", {**MULTI_HOST_OMPI, "MASTER_ADDR": "10.1.2.3"},
     ["algo-1", "algo-2"], "algo-1"),
]


@pytest.mark.parametrize("env, hosts, master", [c[1:] for c in MASTER_CASES], ids=[c[0] for c in MASTER_CASES])
def test_mpi_rank_gets_master_addr(env, hosts, master, sagemaker_tree, empty_dir):
    root = sagemaker_tree(hosts, hosts[1]) if hosts else empty_dir
    info = run_detect(dict(env), root)
    assert info.kind == "mpi"
    assert info.master_addr == master


def test_mpi_ranks_on_several_hosts_without_master_addr_tell_the_user_to_set_it(empty_dir):
    with pytest.raises(ClusterError, match="MASTER_ADDR"):
        run_detect(dict(MULTI_HOST_OMPI), empty_dir)


def test_mpi_rank_on_sagemaker_keeps_node_facts(sagemaker_tree):
    root = sagemaker_tree(["algo-1", "algo-2"], "algo-2", network_interface="ens5")
    info = run_detect(dict(MULTI_HOST_OMPI), root)
    assert info.hosts == ("algo-1", "algo-2")
    assert info.node_rank == 1
    assert info.network_interface == "ens5"
    assert info.instance_type == "ml.p4d.24xlarge"
    assert (info.rank, info.world_size, info.nproc_per_node) == (9, 16, 8)


# ------------------------------------------------------------------ SageMaker


@pytest.mark.parametrize("current, node_rank", [("algo-2", 0), ("algo-10", 1), ("algo-1", 2)])
def test_sagemaker_hosts_keep_resourceconfig_order_and_node_rank_is_the_index(current, node_rank, sagemaker_tree):
    root = sagemaker_tree(["algo-2", "algo-10", "algo-1"], current, network_interface="ens6",
                          instance_type="ml.g5.12xlarge")
    info = run_detect({}, root, num_gpus=4)
    assert info.kind == "sagemaker"
    assert info.hosts == ("algo-2", "algo-10", "algo-1")
    assert info.current_host == current
    assert info.node_rank == node_rank
    assert info.num_nodes == 3
    assert info.master_addr == "algo-2"
    assert info.master_port == 7777
    assert info.network_interface == "ens6"
    assert info.instance_type == "ml.g5.12xlarge"
    assert info.nproc_per_node == 4
    assert info.trains and not info.is_worker


def test_sagemaker_master_port_follows_master_port_variable(sagemaker_tree):
    info = run_detect({"MASTER_PORT": "23456"}, sagemaker_tree(TWO_HOSTS, "algo-1"))
    assert info.kind == "sagemaker" and info.master_port == 23456


def test_sagemaker_variables_alone_describe_the_node(empty_dir):
    info = run_detect(dict(SM_VARS), empty_dir)
    assert info.kind == "sagemaker"
    assert info.hosts == ("algo-1", "algo-2")
    assert (info.node_rank, info.master_addr, info.master_port) == (1, "algo-1", 7777)
    assert info.nproc_per_node == 4


@pytest.mark.parametrize("num_gpus, cpu_procs, expected", [(8, 2, 8), (0, 2, 2), (0, 3, 3)])
def test_sagemaker_workers_per_host_are_gpus_else_cpu_procs(num_gpus, cpu_procs, expected, sagemaker_tree):
    info = run_detect({}, sagemaker_tree(TWO_HOSTS, "algo-1"), num_gpus=num_gpus, cpu_procs=cpu_procs)
    assert info.nproc_per_node == expected


HETERO = {"data": ("ml.c5.2xlarge", ["algo-1"]), "gpu": ("ml.p4d.24xlarge", ["algo-2", "algo-3"])}
HETERO_CASES = [
    # (id, distribution groups hyperparameter or None, current host,
    #  expected hosts, node_rank, master, trains, group, instance type)
    ("gpu-only-first-gpu-host-is-master", ["gpu"], "algo-2",
     ("algo-2", "algo-3"), 0, "algo-2", True, "gpu", "ml.p4d.24xlarge"),
    ("gpu-only-second-gpu-host", ["gpu"], "algo-3",
     ("algo-2", "algo-3"), 1, "algo-2", True, "gpu", "ml.p4d.24xlarge"),
    ("gpu-only-data-host-does-not-train", ["gpu"], "algo-1",
     ("algo-2", "algo-3"), -1, "algo-2", False, "data", "ml.c5.2xlarge"),
    ("default-every-group-trains", None, "algo-3",
     ("algo-1", "algo-2", "algo-3"), 2, "algo-1", True, "gpu", "ml.p4d.24xlarge"),
    ("both-groups-listed", ["data", "gpu"], "algo-1",
     ("algo-1", "algo-2", "algo-3"), 0, "algo-1", True, "data", "ml.c5.2xlarge"),
]


@pytest.mark.parametrize("wanted, current, hosts, node_rank, master, trains, group, itype",
                         [c[1:] for c in HETERO_CASES], ids=[c[0] for c in HETERO_CASES])
def test_heterogeneous_cluster_trains_only_distribution_groups(
        wanted, current, hosts, node_rank, master, trains, group, itype, sagemaker_tree):
    hp = {"train.steps": 5}
    if wanted is not None:
        hp["sagemaker_distribution_instance_groups"] = wanted
    root = sagemaker_tree(None, current, groups=HETERO, hyperparameters=hp)
    info = run_detect({}, root)
    assert info.kind == "sagemaker"
    assert info.hosts == hosts
    assert info.num_nodes == len(hosts)
    assert info.node_rank == node_rank
    assert info.master_addr == master
    assert info.trains is trains
    assert info.current_group == group
    assert info.instance_type == itype
    assert [g.name for g in info.instance_groups] == ["data", "gpu"]


def test_heterogeneous_cluster_with_unknown_distribution_group_is_an_error(sagemaker_tree):
    root = sagemaker_tree(None, "algo-2", groups=HETERO,
                          hyperparameters={"sagemaker_distribution_instance_groups": ["tpu"]})
    with pytest.raises(ClusterError, match="tpu"):
        run_detect({}, root)


# ------------------------------------------------------------------ local and explicit kinds


@pytest.mark.parametrize("num_gpus, cpu_procs, expected", [(4, 2, 4), (0, 2, 2), (0, 1, 1)])
def test_local_machine_is_one_node_with_a_worker_per_gpu_or_cpu_procs(num_gpus, cpu_procs, expected, empty_dir):
    info = run_detect({}, empty_dir, hostname="laptop", num_gpus=num_gpus, cpu_procs=cpu_procs)
    assert info.kind == "local"
    assert info.hosts == ("laptop",) and info.current_host == "laptop"
    assert (info.num_nodes, info.node_rank) == (1, 0)
    assert info.nproc_per_node == expected
    assert info.master_addr == "127.0.0.1"
    assert not info.is_worker and info.trains


FORCED_CASES = [
    # (id, forced kind, env, with tree, expected kind)
    ("local-despite-sagemaker-tree", "local", {}, True, "local"),
    # A forced node-level kind keeps the ranks of a launched worker (else it would spawn again).
    ("local-keeps-torchrun-ranks", "local", TORCHRUN_VARS, True, "torchrun"),
    ("sagemaker-node-facts-for-mpi-ranks", "sagemaker", OMPI_VARS, True, "mpi"),
    ("mpi-on-sagemaker", "mpi", OMPI_VARS, True, "mpi"),
    ("torchrun-from-four-vars", "torchrun", TORCHRUN_VARS, False, "torchrun"),
    # A torchrun worker on a SageMaker host still reports kind "sagemaker" (node facts kept).
    ("torchrun-worker-on-sagemaker-host", "torchrun", TORCHRUN_VARS, True, "sagemaker"),
]


@pytest.mark.parametrize("kind, env, with_tree, expected", [c[1:] for c in FORCED_CASES],
                         ids=[c[0] for c in FORCED_CASES])
def test_explicit_cluster_kind_overrides_detection(kind, env, with_tree, expected, sagemaker_tree, empty_dir):
    root = sagemaker_tree(TWO_HOSTS, "algo-1") if with_tree else empty_dir
    info = run_detect(dict(env), root, kind=kind)
    assert info.kind == expected
    if env:
        assert info.is_worker  # a launched process is never mistaken for a launcher
    if kind == "torchrun":
        assert info.rank == 3
    if kind == "local":
        assert info.hosts != tuple(TWO_HOSTS)  # the SageMaker tree was ignored as asked
    if kind == "sagemaker":
        assert info.hosts == tuple(TWO_HOSTS)


@pytest.mark.parametrize("kind", ["sagemaker", "torchrun", "mpi"])
def test_requested_cluster_kind_that_is_absent_is_an_error(kind, empty_dir):
    with pytest.raises(ClusterError, match=kind):
        run_detect({"MASTER_ADDR": "10.0.0.1"}, empty_dir, kind=kind)


def test_unknown_cluster_kind_is_an_error_naming_it(empty_dir):
    with pytest.raises(ClusterError, match="bogus"):
        run_detect({}, empty_dir, kind="bogus")


# ------------------------------------------------------------------ bad input


def test_malformed_resourceconfig_is_an_error_naming_the_file(sagemaker_tree):
    root = sagemaker_tree(resource_text='{"current_host": "algo-1", "hosts": ["algo-1",')
    with pytest.raises(ClusterError) as err:
        run_detect({}, root)
    assert str(root / "input" / "config" / "resourceconfig.json") in str(err.value)


RESOURCE_ERRORS = [
    # (id, hosts, current host, text expected in the message)
    ("current-host-not-in-hosts", ["algo-1", "algo-2"], "algo-7", "algo-7"),
    ("empty-hosts", [], "algo-1", "hosts"),
    ("duplicate-hosts", ["algo-1", "algo-2", "algo-1"], "algo-1", "twice"),
    ("empty-current-host", ["algo-1"], "", "current_host"),
]


@pytest.mark.parametrize("hosts, current, text", [c[1:] for c in RESOURCE_ERRORS], ids=[c[0] for c in RESOURCE_ERRORS])
def test_bad_resourceconfig_is_an_error(hosts, current, text, sagemaker_tree):
    root = sagemaker_tree(hosts, current)
    with pytest.raises(ClusterError, match=text) as err:
        run_detect({}, root)
    assert "resourceconfig.json" in str(err.value)


def test_current_host_missing_from_sm_hosts_is_an_error(empty_dir):
    with pytest.raises(ClusterError, match="algo-9"):
        run_detect({**SM_VARS, "SM_CURRENT_HOST": "algo-9"}, empty_dir)


BAD_RANK_CASES = [
    # (id, env, variable the message must name)
    ("torchrun-non-integer-rank", {**TORCHRUN_VARS, "RANK": "zero"}, "RANK"),
    ("torchrun-non-integer-world-size", {**ELASTIC_VARS, "WORLD_SIZE": "four"}, "WORLD_SIZE"),
    ("ompi-non-integer-rank", {**OMPI_VARS, "OMPI_COMM_WORLD_RANK": "one"}, "OMPI_COMM_WORLD_RANK"),
    ("pmi-non-integer-size", {**PMI_VARS, "PMI_SIZE": "2.0"}, "PMI_SIZE"),
    ("torchrun-rank-equals-world-size", {**TORCHRUN_VARS, "RANK": "4"}, "RANK"),
    ("torchrun-rank-beyond-world-size", {**ELASTIC_VARS, "RANK": "17"}, "RANK"),
    ("torchrun-negative-rank", {**TORCHRUN_VARS, "RANK": "-1"}, "RANK"),
    ("ompi-rank-equals-world-size", {**OMPI_VARS, "OMPI_COMM_WORLD_RANK": "2"}, "OMPI_COMM_WORLD_RANK"),
]


@pytest.mark.parametrize("env, var", [c[1:] for c in BAD_RANK_CASES], ids=[c[0] for c in BAD_RANK_CASES])
def test_bad_rank_variables_are_an_error_naming_the_variable(env, var, empty_dir):
    with pytest.raises(ClusterError, match=var):
        run_detect(dict(env), empty_dir)


# ------------------------------------------------------------------ purity


NO_MUTATION_CASES = [
    ("local", {"PATH": "/usr/bin"}, False, None),
    ("sagemaker", {"MASTER_ADDR": "x"}, True, None),
    ("torchrun-on-sagemaker", dict(ELASTIC_VARS), True, None),
    ("mpi", dict(OMPI_VARS), False, None),
    ("forced-local", dict(TORCHRUN_VARS), True, "local"),
]


@pytest.mark.parametrize("env, with_tree, kind", [c[1:] for c in NO_MUTATION_CASES],
                         ids=[c[0] for c in NO_MUTATION_CASES])
def test_detect_never_changes_the_environment_it_reads(env, with_tree, kind, sagemaker_tree, empty_dir):
    root = sagemaker_tree(TWO_HOSTS, "algo-2") if with_tree else empty_dir
    before = dict(env)
    detect(env, root, kind=kind)
    assert env == before


def test_cluster_info_is_frozen_and_json_ready(sagemaker_tree):
    info = run_detect({}, sagemaker_tree(None, "algo-2", groups=HETERO))
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.node_rank = 5  # type: ignore[misc]
    data = info.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(ClusterInfo)}
    assert data["hosts"] == ["algo-1", "algo-2", "algo-3"]
    assert data["instance_groups"][1] == {"name": "gpu", "instance_type": "ml.p4d.24xlarge",
                                          "hosts": ["algo-2", "algo-3"]}
