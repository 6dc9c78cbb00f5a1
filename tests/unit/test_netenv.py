"""Tests for the EFA/NCCL environment policy (llm_runtime.netenv)."""
from __future__ import annotations

import logging
import subprocess
from dataclasses import replace
from types import SimpleNamespace

import pytest

from llm_runtime import netenv
from llm_runtime.cluster.base import ClusterInfo
from llm_runtime.netenv import EnvEntry, Fabric, Resolved

INFO = ClusterInfo(
    kind="sagemaker", hosts=("algo-1", "algo-2"), current_host="algo-1", node_rank=0,
    num_nodes=2, nproc_per_node=8, master_addr="algo-1", master_port=7777,
    network_interface="eth0", instance_type="ml.p4d.24xlarge",
)
FI_VERSION = "fi_info: 1.22.0amzn4.0\nlibfabric: 1.22.0amzn4.0\nlibfabric api: 1.22\n"
NO_EFA = Fabric()
EFA_UNKNOWN = Fabric(efa_devices=4, efa_provider=True)
EFA_NEW = Fabric(efa_devices=4, efa_provider=True, ofi_nccl_version="1.7.4-aws",
                 libfabric_version="1.18.0")
EFA_OLD_OFI = Fabric(efa_devices=4, efa_provider=True, ofi_nccl_version="1.6.0",
                     libfabric_version="1.20.0amzn1.0")
EFA_OLD_LF = Fabric(efa_provider=True, ofi_nccl_version="1.9.1", libfabric_version="1.17.1")

TORCH = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
         "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000"}
IFACE = {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0"}
VERIFY = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET", "NCCL_DEBUG_FILE": "/tmp/llm-runtime-nccl.%h.%p.log"}
EFA_BASE = {"FI_PROVIDER": "efa", "NCCL_LAUNCH_MODE": "PARALLEL", "NCCL_NET_SHARED_COMMS": "0", **VERIFY}
CLASSIC = {**EFA_BASE, "NCCL_PROTO": "simple"}

PLAN_CASES = [
    # (id, info, fabric, timeout_dump, expected values)
    ("no-efa", INFO, NO_EFA, True, {**IFACE, **TORCH}),
    ("no-efa-no-iface-no-dump", replace(INFO, network_interface=None), NO_EFA, False,
     {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}),
    ("efa-unknown-p4d", INFO, EFA_UNKNOWN, True,
     {**IFACE, **TORCH, **CLASSIC, "FI_EFA_USE_DEVICE_RDMA": "1"}),
    ("efa-provider-only-p5", replace(INFO, instance_type="p5.48xlarge"), Fabric(efa_provider=True), True,
     {**IFACE, **TORCH, **CLASSIC, "FI_EFA_USE_DEVICE_RDMA": "1"}),
    ("efa-g5-no-rdma", replace(INFO, instance_type="ml.g5.48xlarge"), EFA_UNKNOWN, True,
     {**IFACE, **TORCH, **CLASSIC}),
    ("efa-unknown-instance", replace(INFO, instance_type=None), EFA_UNKNOWN, True,
     {**IFACE, **TORCH, **CLASSIC}),
    ("efa-new-versions", INFO, EFA_NEW, True, {**IFACE, **TORCH, **EFA_BASE}),
    ("efa-old-ofi", INFO, EFA_OLD_OFI, True,
     {**IFACE, **TORCH, **CLASSIC, "FI_EFA_USE_DEVICE_RDMA": "1"}),
    ("efa-old-libfabric", INFO, EFA_OLD_LF, True,
     {**IFACE, **TORCH, **CLASSIC, "FI_EFA_USE_DEVICE_RDMA": "1"}),
    ("efa-half-known", INFO, replace(EFA_NEW, libfabric_version=None), True,
     {**IFACE, **TORCH, **CLASSIC, "FI_EFA_USE_DEVICE_RDMA": "1"}),
]


@pytest.mark.parametrize("info,fabric,timeout_dump,expected",
                         [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_plan_table(info, fabric, timeout_dump, expected):
    got = netenv.plan(info, fabric, timeout_dump=timeout_dump)
    assert {k: e.value for k, e in got.items()} == expected
    assert "RDMAV_FORK_SAFE" not in got
    assert all(isinstance(e, EnvEntry) and e.reason.strip() for e in got.values())
    if not fabric.has_efa:
        assert not [k for k in got if k.startswith("FI_")]


def test_with_verify_efa_off_nccl_debug_is_left_to_the_user():
    got = netenv.plan(INFO, EFA_NEW, verify_efa=False)
    assert not [k for k in got if k.startswith("NCCL_DEBUG")] and got["FI_PROVIDER"].value == "efa"


@pytest.mark.parametrize("mode,environ,planned", [
    ("auto", {}, True), ("require", {}, True), ("off", {}, False),
    ("auto", {"NCCL_DEBUG": "WARN"}, False),        # the user's own NCCL logging stays where they sent it
    ("require", {"NCCL_DEBUG_FILE": "/x.%p"}, False),
])
def test_nccl_debug_is_planned_for_the_efa_check_only_when_the_user_set_none(mode, environ, planned):
    assert netenv.verify_planned(mode, environ) is planned


def test_plan_reasons_name_rules():
    got = netenv.plan(INFO, EFA_UNKNOWN)
    assert "network_interface_name" in got["NCCL_SOCKET_IFNAME"].reason
    assert "efa" in got["FI_PROVIDER"].reason
    assert "p4d" in got["FI_EFA_USE_DEVICE_RDMA"].reason
    assert "classic" in got["NCCL_PROTO"].reason


@pytest.mark.parametrize("fabric,expected", [
    (Fabric(), False), (Fabric(efa_devices=1), True), (Fabric(efa_provider=True), True),
])
def test_has_efa(fabric, expected):
    assert fabric.has_efa is expected


@pytest.mark.parametrize("instance_type,expected", [
    ("ml.p4d.24xlarge", True), ("p5.48xlarge", True), ("ml.p4de.24xlarge", True),
    ("ml.p5en.48xlarge", True), ("ml.trn1n.32xlarge", True), ("trn2.48xlarge", True),
    ("ML.P5E.48XLARGE", True), ("ml.g5.12xlarge", False), ("g5.48xlarge", False),
    ("ml.p3dn.24xlarge", False), ("p4", False), ("", False), (None, False),
])
def test_rdma_capable(instance_type, expected):
    assert netenv.rdma_capable(instance_type) is expected


@pytest.mark.parametrize("text,expected", [
    ("1.22.0amzn4.0", (1, 22, 0)), ("v1.7.4-aws", (1, 7, 4)), ("1.18.0", (1, 18, 0)),
    ("1.7", (1, 7)), ("2", (2,)), (" 1.9.1 ", (1, 9, 1)), ("amzn", None), ("", None), (None, None),
])
def test_parse_version(text, expected):
    assert netenv.parse_version(text) == expected


@pytest.mark.parametrize("output,expected", [
    (FI_VERSION, "1.22.0amzn4.0"),
    ("libfabric: 1.18.0\n", "1.18.0"), ("fi_info: 1.9.0\n", None), ("", None),
])
def test_parse_fi_info_version(output, expected):
    assert netenv.parse_fi_info_version(output) == expected


@pytest.mark.parametrize("path,expected", [
    ("/opt/amazon/ofi-nccl/lib64/libnccl-net.so.1.7.4", "1.7.4"), ("libnccl-net-ofi.so.1.11.0", "1.11.0"),
    ("libnccl-net.so.0.0.0", None), ("libnccl-net.so", None), ("libnccl-net.so.1", None),
])
def test_ofi_nccl_version_from_name(path, expected):
    assert netenv.ofi_nccl_version_from_name(path) == expected


@pytest.mark.parametrize("instance_type,expected", [
    ("ml.p4d.24xlarge", "p4d"), ("trn1n.32xlarge", "trn1n"), (" ML.G5.XLARGE ", "g5"), ("", None), (None, None),
])
def test_instance_family(instance_type, expected):
    assert netenv.instance_family(instance_type) == expected


@pytest.mark.parametrize("ofi,lf,expected", [
    ("1.7.4-aws", "1.18.0", True), ("1.7.0", "1.22.0amzn4.0", True), ("1.6.0", "1.20.0", False),
    ("1.9.0", "1.17.9", False), (None, "1.22.0", False), ("1.8.0", None, False), ("v2.0", "2.0", True),
])
def test_versions_new_enough(ofi, lf, expected):
    fabric = Fabric(efa_provider=True, ofi_nccl_version=ofi, libfabric_version=lf)
    assert netenv.versions_new_enough(fabric) is expected


@pytest.mark.parametrize("info,fabric,needles", [
    (INFO, NO_EFA, ["no EFA devices found", "TCP sockets"]),
    (replace(INFO, network_interface=None), NO_EFA, ["no network interface known"]),
    (INFO, EFA_UNKNOWN, ["version unknown", "classic"]),
    (INFO, EFA_OLD_OFI, ["older than", "classic"]),
    (INFO, EFA_NEW, ["plugin picks the protocol"]),
    (replace(INFO, instance_type="ml.g5.12xlarge"), EFA_UNKNOWN, ["ml.g5.12xlarge", "FI_EFA_USE_DEVICE_RDMA"]),
])
def test_notes(info, fabric, needles):
    text = "\n".join(netenv.notes(info, fabric))
    for needle in needles:
        assert needle in text


PLAN = netenv.plan(INFO, EFA_UNKNOWN)


@pytest.mark.parametrize("environ,expected", [
    ({}, {n: ("plan", e.value) for n, e in PLAN.items()}),
    ({"NCCL_PROTO": "LL128"}, {**{n: ("plan", e.value) for n, e in PLAN.items()}, "NCCL_PROTO": ("user", "LL128")}),
    ({"NCCL_PROTO": "Simple", "NCCL_DEBUG": "INFO", "PATH": "/bin"},
     {**{n: ("plan", e.value) for n, e in PLAN.items()}, "NCCL_PROTO": ("user", "Simple"),
      "NCCL_DEBUG": ("user", "INFO")}),
])
def test_resolve_user_wins(environ, expected):
    got = netenv.resolve(PLAN, environ)
    assert {n: (r.source, r.value) for n, r in got.items()} == expected
    assert all(isinstance(r, Resolved) and r.reason for r in got.values())


def test_resolve_reasons():
    got = netenv.resolve(PLAN, {"NCCL_PROTO": "LL128", "FI_PROVIDER": "efa"})
    assert got["NCCL_PROTO"].reason.startswith("set by the user; plan suggested simple because ")
    assert PLAN["NCCL_PROTO"].reason in got["NCCL_PROTO"].reason
    assert got["FI_PROVIDER"].reason == "set by the user (same as plan)"
    assert got["NCCL_LAUNCH_MODE"].reason == PLAN["NCCL_LAUNCH_MODE"].reason


@pytest.mark.parametrize("environ,names", [
    ({}, []),
    ({"FI_PROVIDER": "efa", "NCCL_PROTO": "simple"}, []),
    ({"NCCL_PROTO": "LL128"}, ["NCCL_PROTO"]),
    ({"NCCL_PROTO": "LL", "NCCL_SOCKET_IFNAME": "ens5", "NCCL_DEBUG": "INFO"}, ["NCCL_SOCKET_IFNAME", "NCCL_PROTO"]),
])
def test_conflicts(environ, names):
    lines = netenv.conflicts(PLAN, environ)
    assert sorted(line.split("=", 1)[0] for line in lines) == sorted(names)
    for line in lines:
        name = line.split("=", 1)[0]
        assert environ[name] in line and PLAN[name].value in line and PLAN[name].reason in line


def test_apply_never_overrides_and_returns_new_names(caplog):
    environ = {"NCCL_PROTO": "LL128", "FI_PROVIDER": "efa", "HOME": "/root"}
    with caplog.at_level(logging.WARNING, logger="llm_runtime.netenv"):
        set_names = netenv.apply(PLAN, environ)
    assert set(set_names) == set(PLAN) - {"NCCL_PROTO", "FI_PROVIDER"}
    assert environ["NCCL_PROTO"] == "LL128" and environ["FI_PROVIDER"] == "efa"
    assert all(environ[n] == PLAN[n].value for n in set_names)
    assert environ["HOME"] == "/root"
    assert [r.getMessage() for r in caplog.records] == netenv.conflicts(PLAN, {"NCCL_PROTO": "LL128"})
    assert netenv.apply(PLAN, environ) == []


def test_format_table_aligned():
    text = netenv.format_table(netenv.resolve(PLAN, {"NCCL_PROTO": "LL128"}))
    lines = text.splitlines()
    assert lines[0].split(" | ")[:3] == ["VAR".ljust(len("TORCH_NCCL_ASYNC_ERROR_HANDLING")),
                                          "value".ljust(max(len(e.value) for e in PLAN.values())), "source"]
    assert len(lines) == len(PLAN) + 2
    bars = {line.index(" | ") for line in lines if " | " in line}
    assert len(bars) == 1
    assert any(line.startswith("NCCL_PROTO ") and "| user " in line for line in lines)


@pytest.mark.parametrize("fabric,forwarded", [
    (EFA_UNKNOWN, {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "NCCL_PROTO", "NCCL_LAUNCH_MODE", "NCCL_NET_SHARED_COMMS",
                   "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_DEBUG_FILE", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
                   "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_TRACE_BUFFER_SIZE"}),
    (NO_EFA, {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
              "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_TRACE_BUFFER_SIZE"}),
], ids=["efa-p4d", "no-efa"])
def test_mpirun_forwards_the_network_variables_to_every_remote_rank_by_name(fabric, forwarded):
    # What `llm-runtime launch --mpi` does on the first host: apply the plan, then run mpirun.
    from llm_runtime.launch import Target, mpi_export_names, mpirun_argv

    plan, environ = netenv.plan(INFO, fabric), {}
    netenv.apply(plan, environ)
    argv = mpirun_argv(INFO, Target(module="llm_runtime", args=("train",)), nproc=8, python="/usr/bin/python3",
                       export=mpi_export_names(environ, netenv.mpi_exports(plan)))
    exported = [argv[i + 1] for i, flag in enumerate(argv) if flag == "-x"]
    # Each name once, no value in the line (mpirun -x NAME sends the value applied here), and no
    # FI_* variables from a host without EFA.
    assert sorted(exported) == sorted(forwarded | {"MASTER_ADDR=algo-1"})
    assert forwarded <= environ.keys()


# ---------------------------------------------------------------- probe_fabric

FI_INFO_EFA = """provider: efa
    fabric: efa
    domain: rdmap16s27-rdm
    version: 122.0
    type: FI_EP_RDM
    protocol: FI_PROTO_EFA
"""


def fake_run(listing=FI_INFO_EFA, version=FI_VERSION, exc=None, rc=0):
    calls = []

    def run(argv, **kwargs):
        calls.append((argv, kwargs))
        assert kwargs.get("timeout") == netenv.SUBPROCESS_TIMEOUT_S
        if exc is not None:
            raise exc
        out = listing if argv[1:] == ["-p", "efa"] else version
        return SimpleNamespace(returncode=rc, stdout=out, stderr="")

    run.calls = calls
    return run


def make_root(tmp_path, devices=(), driver_devices=(), ofi_lib=None, version_file=None):
    ib = tmp_path / "sys" / "class" / "infiniband"
    ib.mkdir(parents=True)
    for name in devices:
        (ib / name).mkdir()
    drivers = tmp_path / "sys" / "bus" / "pci" / "drivers"
    for name, driver in driver_devices:
        (drivers / driver).mkdir(parents=True, exist_ok=True)
        (ib / name / "device").mkdir(parents=True)
        (ib / name / "device" / "driver").symlink_to(drivers / driver)
    if ofi_lib:
        lib = tmp_path / "opt" / "amazon" / "ofi-nccl" / "lib64"
        lib.mkdir(parents=True)
        (lib / ofi_lib).write_text("")
        if version_file:
            (lib.parent / "VERSION").write_text(version_file)
    return str(tmp_path)


def test_probe_efa_host(tmp_path):
    root = make_root(tmp_path, devices=["efa_0", "mlx5_0"],
                     driver_devices=[("rdmap16s27", "efa"), ("rdmap32s27", "efa"), ("mlx5_1", "mlx5_core")],
                     ofi_lib="libnccl-net.so.1.7.4")
    run = fake_run()
    fabric = netenv.probe_fabric(root, run=run)
    assert fabric.efa_devices == 3 and fabric.efa_provider
    assert fabric.libfabric_version == "1.22.0amzn4.0" and fabric.ofi_nccl_version == "1.7.4"
    assert fabric.has_efa and len(run.calls) == 2


@pytest.mark.parametrize("ofi_lib,version_file,expected", [
    ("libnccl-net.so.1.9.1", None, "1.9.1"),
    ("libnccl-net.so", "1.8.1-aws\n", "1.8.1-aws"),
    ("libnccl-net.so.0.0.0", "v1.11.0-aws", "v1.11.0-aws"),
    ("libnccl-net-ofi.so", None, None),
    (None, None, None),
])
def test_probe_ofi_nccl_version(tmp_path, ofi_lib, version_file, expected):
    root = make_root(tmp_path, ofi_lib=ofi_lib, version_file=version_file)
    assert netenv.probe_fabric(root, run=fake_run()).ofi_nccl_version == expected


@pytest.mark.parametrize("run", [
    fake_run(exc=FileNotFoundError("fi_info")),
    fake_run(exc=subprocess.TimeoutExpired(["fi_info"], 5)),
    fake_run(exc=PermissionError("fi_info")),
    fake_run(rc=1, listing="fi_getinfo: -61 (No data available)"),
    fake_run(listing="provider: tcp\n    fabric: 10.0.0.0/24\n", version="garbage"),
], ids=["missing", "timeout", "permission", "nonzero-exit", "no-efa-provider"])
def test_probe_fi_info_failures_leave_facts_unknown(tmp_path, run):
    fabric = netenv.probe_fabric(make_root(tmp_path), run=run)
    assert not fabric.efa_provider and fabric.libfabric_version is None
    assert fabric.efa_devices == 0 and not fabric.has_efa


def test_probe_missing_sys_tree(tmp_path):
    fabric = netenv.probe_fabric(str(tmp_path / "nowhere"), run=fake_run(exc=FileNotFoundError()))
    assert fabric == replace(Fabric(), nccl_version=fabric.nccl_version, gpus=fabric.gpus,
                             torch_version=fabric.torch_version)


def test_probe_overrides_win(tmp_path):
    root = make_root(tmp_path, devices=["efa_0"], ofi_lib="libnccl-net.so.1.7.4")
    run = fake_run()
    fabric = netenv.probe_fabric(root, run=run, overrides={
        "efa_devices": "0", "efa_provider": "false", "libfabric_version": "1.17.0",
        "ofi_nccl_version": None, "gpus": 8, "nccl_version": "2.21.5"})
    assert fabric == Fabric(0, False, "1.17.0", None, "2.21.5", 8, fabric.torch_version)
    assert run.calls == []  # every fi_info fact pinned: no subprocess


@pytest.mark.parametrize("overrides,needle", [
    ({"efa_count": 1}, "efa_count"),
    ({"efa_devices": "many"}, "efa_devices"),
    ({"efa_provider": "maybe"}, "efa_provider"),
])
def test_probe_bad_overrides_name_the_key(tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        netenv.probe_fabric(str(tmp_path), run=fake_run(), overrides=overrides)


@pytest.mark.parametrize("overrides,expected", [
    ({"efa_provider": "yes"}, {"efa_provider": True}),
    ({"efa_provider": True, "gpus": "4"}, {"efa_provider": True, "gpus": 4}),
    ({"libfabric_version": "none", "ofi_nccl_version": " 1.7.4 "}, {"libfabric_version": None, "ofi_nccl_version": "1.7.4"}),
    (None, {}),
])
def test_coerce_overrides(overrides, expected):
    assert netenv.coerce_overrides(overrides) == expected


@pytest.mark.parametrize("torch_version,name", [
    (None, "TORCH_NCCL_TRACE_BUFFER_SIZE"), ("2.6.0", "TORCH_NCCL_TRACE_BUFFER_SIZE"),
    ("2.7.0", "TORCH_FR_BUFFER_SIZE"), ("2.13.0+cpu", "TORCH_FR_BUFFER_SIZE"),
])
def test_flight_recorder_buffer_uses_the_name_the_installed_torch_reads(torch_version, name):
    env_plan = netenv.plan(INFO, Fabric(torch_version=torch_version))
    assert env_plan[name].value == "2000"
    other = {"TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"} - {name}
    assert not other & env_plan.keys()
