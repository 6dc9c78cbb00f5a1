"""The ``llm-runtime`` command, called in-process (llm_runtime.cli.main).

Nothing is started: the fabric probe (which runs fi_info) and ``execute`` (the one place
that starts processes) are replaced; the plan ``execute`` would have carried out is recorded.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os

import pytest
import torch.distributed as dist

from llm_runtime import cli, netenv
from llm_runtime.cluster import ClusterInfo

# The package re-exports the detect() function under the submodule's name.
detect_module = importlib.import_module("llm_runtime.cluster.detect")

SECRETS = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-SECRETVALUE42",
           "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEBkaDSESSIONTOKEN42"}
_CLEARED_NAMES = {"TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
                  "LOCAL_WORLD_SIZE", "GROUP_RANK", "SAGEMAKER_PROGRAM", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                  *SECRETS}
_CLEARED_PREFIXES = ("OMPI_", "PMI_", "SM_", "LLM_RUNTIME_", "NCCL_", "FI_", "TORCH_NCCL_", "TORCH_FR_", "RDMAV_")
OMPI_VARS = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
             "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


@pytest.fixture
def started(monkeypatch, empty_dir):
    """A clean launcher environment; yields the list of plans ``execute`` was asked to run."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name in _CLEARED_NAMES or name.startswith(_CLEARED_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(empty_dir))
    monkeypatch.setattr(netenv, "probe_fabric", lambda *args, **kwargs: netenv.Fabric())
    monkeypatch.setattr(detect_module, "probe_gpus", lambda: 0)
    plans: list = []

    def fake_execute(plan, info, **kwargs):
        plans.append(plan)
        return 0

    monkeypatch.setattr(cli, "execute", fake_execute)
    yield plans
    # netenv.apply writes os.environ directly on a real launch; undo that too.
    os.environ.clear()
    os.environ.update(saved)


def use_tree(monkeypatch, root) -> None:
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(root))


def run(capsys, *argv: str):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ info


def test_info_json_prints_every_cluster_field_and_the_env_plan(started, capsys):
    rc, out, _ = run(capsys, "info", "--json")
    assert rc == 0
    data = json.loads(out)
    assert set(data["cluster"]) == {f.name for f in dataclasses.fields(ClusterInfo)}
    assert data["cluster"]["kind"] == "local"
    assert data["env"], "the env plan is empty"
    for name, entry in data["env"].items():
        assert set(entry) == {"value", "reason", "source"}, name
    assert data["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["source"] == "plan"


@pytest.mark.parametrize("gpus, recorded", [(0, False), (8, True)])
def test_flight_recorder_is_planned_only_on_gpu_hosts(gpus, recorded, started, capsys, monkeypatch):
    monkeypatch.setattr(netenv, "probe_fabric", lambda *args, **kwargs: netenv.Fabric(gpus=gpus, torch_version="2.13"))
    rc, out, _ = run(capsys, "info", "--json")
    env = json.loads(out)["env"]
    assert rc == 0 and ("TORCH_FR_BUFFER_SIZE" in env) is recorded and ("TORCH_NCCL_DUMP_ON_TIMEOUT" in env) is recorded
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"  # always


def test_info_json_on_sagemaker_shows_hosts_in_resourceconfig_order(started, capsys, monkeypatch, sagemaker_tree):
    use_tree(monkeypatch, sagemaker_tree(["algo-2", "algo-10", "algo-1"], "algo-1", network_interface="ens5"))
    rc, out, _ = run(capsys, "info", "--json")
    assert rc == 0
    cluster = json.loads(out)["cluster"]
    assert cluster["kind"] == "sagemaker"
    assert cluster["hosts"] == ["algo-2", "algo-10", "algo-1"]
    assert (cluster["node_rank"], cluster["master_addr"], cluster["master_port"]) == (2, "algo-2", 7777)
    env = json.loads(out)["env"]
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "ens5"
    assert env["NCCL_SOCKET_IFNAME"]["source"] == "plan"


def test_info_cluster_option_forces_the_kind(started, capsys, monkeypatch, sagemaker_tree):
    use_tree(monkeypatch, sagemaker_tree(["algo-1", "algo-2"], "algo-2"))
    rc, out, _ = run(capsys, "info", "--json", "--cluster", "local")
    assert rc == 0
    assert json.loads(out)["cluster"]["kind"] == "local"


@pytest.mark.parametrize("with_tree", [True, False], ids=["sagemaker", "local"])
def test_info_shows_user_set_nccl_socket_ifname_as_user(with_tree, started, capsys, monkeypatch, sagemaker_tree):
    if with_tree:
        use_tree(monkeypatch, sagemaker_tree(["algo-1"], "algo-1", network_interface="eth0"))
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ens9")
    rc, out, _ = run(capsys, "info", "--json")
    assert rc == 0
    entry = json.loads(out)["env"]["NCCL_SOCKET_IFNAME"]
    assert entry["value"] == "ens9"
    assert entry["source"] == "user"


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"]], ids=["text", "json"])
def test_info_never_prints_aws_secret_values(argv, started, capsys, monkeypatch, sagemaker_tree):
    use_tree(monkeypatch, sagemaker_tree(["algo-1", "algo-2"], "algo-1"))
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    rc, out, err = run(capsys, *argv)
    assert rc == 0
    assert out.strip()
    for value in SECRETS.values():
        assert value not in out
        assert value not in err


# ------------------------------------------------------------------ launch (plans only)


def test_launch_on_sagemaker_plans_multinode_torchrun(started, capsys, monkeypatch, sagemaker_tree):
    use_tree(monkeypatch, sagemaker_tree(["algo-1", "algo-2"], "algo-2"))
    rc, _, _ = run(capsys, "launch", "--nproc-per-node", "3", "--max-restarts=1", "-m", "my.module", "--x", "1")
    assert rc == 0
    [plan] = started
    argv = list(plan.argv)
    assert plan.action == "torchrun"
    assert argv[argv.index("--nnodes") + 1] == "2"
    assert argv[argv.index("--node-rank") + 1] == "1"
    assert argv[argv.index("--master-addr") + 1] == "algo-1"
    assert argv[argv.index("--nproc-per-node") + 1] == "3"
    assert argv[-4:] == ["-m", "my.module", "--x", "1"]
    assert plan.env == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def test_launch_with_mpi_hyperparameter_plans_mpirun_without_secret_values(
        started, capsys, monkeypatch, sagemaker_tree):
    use_tree(monkeypatch, sagemaker_tree(["algo-1", "algo-2"], "algo-1", network_interface="ens5", hyperparameters={
        "sagemaker_mpi_enabled": True, "sagemaker_mpi_num_of_processes_per_host": 4}))
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    rc, out, err = run(capsys, "launch", "-m", "my.module")
    assert rc == 0
    [plan] = started
    assert plan.action == "mpirun"
    argv = list(plan.argv)
    assert argv[argv.index("--host") + 1] == "algo-1:4,algo-2:4"
    assert argv[argv.index("-np") + 1] == "8"
    assert "btl_tcp_if_include" in argv and argv[argv.index("btl_tcp_if_include") + 1] == "ens5"
    names = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert "AWS_SECRET_ACCESS_KEY" in names
    for value in SECRETS.values():
        assert value not in " ".join(argv) and value not in out and value not in err


def test_launch_train_runs_the_sagemaker_program_with_its_hyperparameters(
        started, capsys, monkeypatch, sagemaker_tree):
    root = sagemaker_tree(["algo-1"], "algo-1", code_files=["entry.py"], hyperparameters={
        "sagemaker_program": "entry.py", "epochs": 2, "train.steps": 5})
    use_tree(monkeypatch, root)
    rc, _, _ = run(capsys, "launch", "train")
    assert rc == 0
    [plan] = started
    argv = list(plan.argv)
    tail = argv[argv.index(str(root / "code" / "entry.py")):]
    assert tail == [str(root / "code" / "entry.py"), "--epochs", "2", "--train.steps", "5"]


def test_launch_on_host_outside_distribution_groups_idles(started, capsys, monkeypatch, sagemaker_tree):
    use_tree(monkeypatch, sagemaker_tree(None, "algo-3", groups={
        "gpu": ("ml.p4d.24xlarge", ["algo-1", "algo-2"]), "data": ("ml.c5.2xlarge", ["algo-3"])},
        hyperparameters={"sagemaker_distribution_instance_groups": ["gpu"]}))
    rc, _, _ = run(capsys, "launch", "-m", "my.module")
    assert rc == 0
    assert [p.action for p in started] == ["idle"]


# ------------------------------------------------------------------ bad input: exit 2, one line

BAD_INPUT_CASES = [
    # (id, argv, env, tree kwargs or None, text the message names)
    ("info-malformed-resourceconfig", ["info"], {}, {"resource_text": '{"hosts": ['}, "resourceconfig.json"),
    ("launch-malformed-resourceconfig", ["launch", "-m", "m"], {}, {"resource_text": "not json"},
     "resourceconfig.json"),
    ("info-current-host-not-in-hosts", ["info", "--json"], {}, {"hosts": ["algo-1", "algo-2"],
                                                                "current_host": "algo-9"}, "algo-9"),
    ("info-cluster-bogus", ["info", "--cluster", "bogus"], {}, None, "bogus"),
    ("launch-cluster-bogus", ["launch", "--cluster", "bogus", "-m", "m"], {}, None, "bogus"),
    ("launch-cluster-absent", ["launch", "--cluster=mpi", "-m", "m"], {}, None, "mpi"),
    ("launch-nproc-per-node-0", ["launch", "--nproc-per-node", "0", "-m", "m"], {}, None, "nproc"),
    ("launch-nproc-per-node-negative", ["launch", "--nproc-per-node=-1", "-m", "m"], {}, None, "nproc"),
    ("launch-nproc-per-node-word", ["launch", "--nproc-per-node", "many", "-m", "m"], {}, None, "nproc-per-node"),
    ("launch-max-restarts-negative", ["launch", "--max-restarts", "-2", "-m", "m"], {}, None, "restarts"),
    ("info-rank-conflicts-with-ompi", ["info"], {**OMPI_VARS, "RANK": "0"}, None, "RANK"),
    ("launch-rank-conflicts-with-ompi", ["launch", "-m", "m"], {**OMPI_VARS, "RANK": "0"}, None, "RANK"),
    ("info-non-integer-rank", ["info"], {"TORCHELASTIC_RUN_ID": "x", "RANK": "first", "WORLD_SIZE": "2",
                                         "MASTER_ADDR": "h", "MASTER_PORT": "1"}, None, "RANK"),
    ("launch-missing-target", ["launch"], {}, None, "target"),
    ("launch-missing-target-after-options", ["launch", "--nproc-per-node", "2"], {}, None, "target"),
    ("launch-script-does-not-exist", ["launch", "no_such_script.py"], {}, None, "no_such_script.py"),
    ("train-batch-not-divisible", ["train", "--nproc-per-node", "3", "--train.batch_size=16"], {}, None,
     "batch_size"),
    ("train-unknown-key", ["train", "--train.stepz=3"], {}, None, "train.stepz"),
    ("train-bad-choice-from-env", ["train"], {"LLM_RUNTIME_TRAIN_LR_SCHEDULE": "linear"}, None,
     "LLM_RUNTIME_TRAIN_LR_SCHEDULE"),
    ("train-bad-hyperparameter", ["train"], {}, {"hosts": ["algo-1"], "hyperparameters": {"train.steps": "x"}},
     "hyperparameters"),
    ("launch-sagemaker-program-not-python", ["launch", "train"], {"SAGEMAKER_PROGRAM": "run.sh"}, None, "run.sh"),
    ("train-fault-spec-malformed", ["train"], {"LLM_RUNTIME_FAULT": "hang:rank=x"}, None, "LLM_RUNTIME_FAULT"),
    ("train-checkpoint-uri-scheme", ["train", "--checkpoint.uri=gs://b/c"], {}, None, "checkpoint.uri"),
    ("train-checkpoint-uri-bucket", ["train", "--checkpoint.uri=s3://B_b/c"], {}, None, "bucket"),
    ("train-checkpoint-run-id", ["train", "--checkpoint.run_id=../x"], {}, None, "checkpoint.run_id"),
    ("train-checkpoint-resume", ["train", "--checkpoint.resume=latest"], {}, None, "checkpoint.resume"),
    ("train-checkpoint-keep", ["train", "--checkpoint.keep=0"], {}, None, "checkpoint.keep"),
    ("train-data-uri-scheme", ["train", "--data.uri=gs://b/tokens"], {}, None, "data.uri"),
    ("train-data-uri-missing", ["train", "--data.uri=/no/such/tokens"], {}, None, "/no/such/tokens/index.json"),
    ("train-range-from-flag", ["train", "--watchdog.multiple=-5"], {}, None,
     "watchdog.multiple=-5.0 (from command line --watchdog.multiple): expects a finite number >= 1"),
    ("launch-range-from-env", ["launch", "-m", "m"], {"LLM_RUNTIME_HEALTH_ITERS": "0"}, None,
     "health.iters=0 (from environment variable LLM_RUNTIME_HEALTH_ITERS): expects an integer >= 1"),
    ("train-range-from-hyperparameter", ["train"], {}, {"hosts": ["algo-1"],
                                                        "hyperparameters": {"launch.stop_deadline_s": "-3"}},
     "launch.stop_deadline_s=-3.0 (from SageMaker hyperparameters.json): expects a finite number >= 0"),
    ("train-cross-key-rule", ["train", "--parallel.pp=2", "--parallel.stages_per_rank=2"], {}, None,
     "needs parallel.pp_schedule=interleaved"),
]


def _case(c):
    """Plain rows are (id, *values); rows that need marks are already pytest.param."""
    return pytest.param(*c[1:], id=c[0]) if isinstance(c[0], str) else c


@pytest.mark.parametrize("argv, env, tree, text", [_case(c) for c in BAD_INPUT_CASES])
def test_bad_input_exits_2_with_one_line_naming_the_problem(
        argv, env, tree, text, started, capsys, monkeypatch, sagemaker_tree):
    if tree is not None:
        use_tree(monkeypatch, sagemaker_tree(**tree))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc, out, err = run(capsys, *argv)
    assert rc == 2, f"exit {rc}; stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert text in lines[0]
    assert lines[0].startswith(f"llm-runtime {argv[0]}: error:")
    assert out == ""
    assert started == [], "a bad input still reached execute()"
    assert not dist.is_initialized(), "a bad input created a process group"


@pytest.mark.parametrize("argv, rc", [([], 2), (["help"], 0), (["--help"], 0)])
def test_usage_is_printed_for_no_command_or_help(argv, rc, started, capsys):
    got, out, _ = run(capsys, *argv)
    assert got == rc
    assert "usage: llm-runtime" in out


def test_unknown_command_exits_2_naming_it(started, capsys):
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2
    assert "frobnicate" in err


@pytest.mark.parametrize("version, ok", [
    ("2.13.0", True), ("2.13.0+cpu", True), ("2.9.0", True), ("2.11.0a0+git1234", True), ("3.0.1", True),
    ("2.8.1", False), ("2.6.0+cu124", False), ("1.13.1", False),
])
def test_a_torch_without_signals_to_handle_is_refused_naming_the_floor(version, ok):
    from llm_runtime.launch import torch_too_old

    message = torch_too_old(version)
    assert (message is None) == ok
    if not ok:
        assert f"torch {version} is too old" in message and "torch >= 2.9" in message and "SIGTERM" in message


def test_an_unreadable_torch_version_is_named():
    from llm_runtime.launch import torch_too_old

    assert "not a version" in torch_too_old("nightly")


def test_the_launcher_refuses_an_old_torch_in_one_line_before_anything_starts(monkeypatch, capsys):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.6.0+cu124" if name == "torch" else real(name))
    assert cli.main(["train", "--train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("llm-runtime train: error: torch 2.6.0+cu124 is too old")


def test_a_local_job_host_gets_sagemakers_files_and_a_loopback_only_docker_run(tmp_path):
    from llm_runtime.local_job import docker_run_argv, host_files

    files = host_files(1, 3, {"train.steps": 5, "data.uri": "s3://b/t"}, ["train"], "ml.c5.xlarge")
    resource = json.loads(files["resourceconfig.json"])
    assert resource["current_host"] == "algo-2" and resource["hosts"] == ["algo-1", "algo-2", "algo-3"]
    assert resource["network_interface_name"] == "lo"
    assert json.loads(files["hyperparameters.json"]) == {"train.steps": "5", "data.uri": '"s3://b/t"'}  # JSON strings
    assert list(json.loads(files["inputdataconfig.json"])) == ["train"]
    argv = docker_run_argv("img", 1, 3, tmp_path / "algo-2", "job", ["AWS_SECRET_ACCESS_KEY"], {"train": tmp_path})
    assert argv[-2:] == ["img", "train"] and argv[argv.index("--network") + 1] == "host"
    assert argv[argv.index("--hostname") + 1] == "algo-2" and "job-algo-2" in argv
    hosts = [argv[i + 1] for i, a in enumerate(argv) if a == "--add-host"]
    assert hosts == ["algo-1:127.0.1.1", "algo-2:127.0.1.2", "algo-3:127.0.1.3"]
    assert argv[argv.index("-e") + 1] == "AWS_SECRET_ACCESS_KEY"  # by name: no value in argv
    assert f"{tmp_path}:/opt/ml/input/data/train:ro" in argv


@pytest.mark.parametrize("args, needle", [
    (["--hp", "novalue"], "--hp 'novalue': expected KEY=VALUE"),
    (["--channel", "train=/no/such/dir"], "expected NAME=PATH to an existing directory"),
    (["--env", "LLM_RUNTIME_TEST_UNSET_VARIABLE"], "--env LLM_RUNTIME_TEST_UNSET_VARIABLE: not set"),
    (["--hosts", "0"], "--hosts 0: 1 to 254 hosts"),
])
def test_a_local_job_with_bad_options_is_one_line_and_exit_2_before_any_container(args, needle, tmp_path, capsys):
    assert cli.main(["local-job", "--image", "img", "--workdir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_jobs_ssh_trusts_exactly_its_hosts_keys_and_sshd_listens_on_the_hosts_own_address(tmp_path):
    from llm_runtime.sshkeys import authorized_keys, known_hosts, rsh_env, sshd_argv

    hosts = {"algo-2": ("127.0.1.2", "ssh-ed25519 BBBB host-2\n"), "algo-1": ("127.0.1.1", "ssh-ed25519 AAAA host-1")}
    assert known_hosts(hosts) == "algo-1,127.0.1.1 ssh-ed25519 AAAA host-1\nalgo-2,127.0.1.2 ssh-ed25519 BBBB host-2\n"
    assert authorized_keys(["ssh-ed25519 C c1", "ssh-ed25519 D c2\n", "ssh-ed25519 C c1"]) == \
        "ssh-ed25519 C c1\nssh-ed25519 D c2\n"
    argv = sshd_argv("/usr/sbin/sshd", tmp_path, "127.0.1.2")
    assert "-oListenAddress=127.0.1.2" in argv and argv[argv.index("-h") + 1] == str(tmp_path / "host_key")
    assert f"-oAuthorizedKeysFile={tmp_path / 'authorized_keys'}" in argv and "-oPasswordAuthentication=no" in argv
    env = rsh_env(tmp_path)
    assert f"-i {tmp_path / 'client_key'}" in env["OMPI_MCA_plm_rsh_args"]
    assert "StrictHostKeyChecking=yes" in env["OMPI_MCA_plm_rsh_args"] and env["OMPI_MCA_plm_rsh_no_tree_spawn"] == "1"


def test_a_local_jobs_report_names_each_hosts_exit_code_model_and_failure(tmp_path, capsys):
    from llm_runtime.local_job import _report

    for host, files in (("algo-1", ["config.json"]), ("algo-2", [])):
        (tmp_path / host / "model").mkdir(parents=True)
        (tmp_path / host / "output").mkdir()
        for name in files:
            (tmp_path / host / "model" / name).write_text("{}")
    (tmp_path / "algo-2" / "output" / "failure").write_text("exit 86: rank 1 hung in a collective\nstacks...\n")
    code = _report(tmp_path, ["job-algo-1", "job-algo-2"], {"job-algo-2": 86, "job-algo-1": 0})
    assert code == 86
    summary = json.loads((tmp_path / "local-job.json").read_text())
    assert summary["algo-1"] == {"exit_code": 0, "model": ["config.json"], "failure": None,
                                 "log": str(tmp_path / "algo-1.log")}
    assert summary["algo-2"]["exit_code"] == 86 and summary["algo-2"]["failure"] == "exit 86: rank 1 hung in a collective"
    out = capsys.readouterr().out
    assert "local-job: algo-2: exit 86, model 0 file(s), failure: exit 86: rank 1 hung" in out
