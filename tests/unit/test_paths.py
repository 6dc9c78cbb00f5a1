"""JobPaths: where a job's files go, derived once from the config, the cluster kind and the environment."""
import os

import pytest

from llm_runtime.config import Config, load_config
from llm_runtime.paths import job_paths

SM = {"SAGEMAKER_BASE_DIR": "/sm"}


def paths(kind="torchrun", env=None, **keys):
    return job_paths(load_config(cli=[(k.replace("__", "."), v) for k, v in keys.items()]), kind, env or {})


@pytest.mark.parametrize("keys,env,kind,expected", [
    ({"train__output_dir": "/x"}, {"SM_OUTPUT_DIR": "/y"}, "sagemaker", "/x"),
    ({}, {"SM_OUTPUT_DIR": "/y"}, "torchrun", "/y"),
    ({}, {}, "sagemaker", "/opt/ml/output"),
    ({}, SM, "sagemaker", "/sm/output"),
    ({}, {}, "torchrun", ""),
])
def test_failure_records_go_to_the_configured_or_sagemaker_output_dir(keys, env, kind, expected):
    got = paths(kind, env, **keys)
    assert got.output_dir == expected
    assert got.failure_file == (f"{expected}/failure" if expected else "")


@pytest.mark.parametrize("keys,env,kind,expected", [
    ({"metrics__jsonl": "/x/m.jsonl"}, {}, "sagemaker", "/x/m.jsonl"),
    ({"metrics__jsonl": "none"}, {}, "sagemaker", ""),
    ({}, {"SM_OUTPUT_DATA_DIR": "/d"}, "torchrun", "/d/metrics.jsonl"),
    ({}, {}, "sagemaker", "/opt/ml/output/data/metrics.jsonl"),
    ({"train__output_dir": "/o"}, {}, "torchrun", "/o/metrics.jsonl"),
    ({}, {}, "local", ""),
])
def test_the_jsonl_file_defaults_to_what_sagemaker_uploads_or_the_output_dir(keys, env, kind, expected):
    assert paths(kind, env, **keys).metrics_jsonl == expected


@pytest.mark.parametrize("keys,kind,expected", [
    ({}, "sagemaker", "/opt/ml/output/tensorboard"),
    ({"train__output_dir": "/o"}, "torchrun", "/o/tensorboard"),
    ({"metrics__tensorboard_dir": "/tb"}, "sagemaker", "/tb"),
])
def test_tensorboard_files_go_where_sagemaker_uploads_them(keys, kind, expected):
    assert paths(kind, {}, **keys).tensorboard_dir == expected


@pytest.mark.parametrize("keys,env,kind,expected", [
    ({"train__model_dir": "/m"}, {"SM_MODEL_DIR": "/y"}, "sagemaker", "/m"),
    ({}, {"SM_MODEL_DIR": "/y"}, "torchrun", "/y"),
    ({}, {}, "sagemaker", "/opt/ml/model"),
    ({}, {}, "local", ""),
])
def test_the_final_model_goes_to_the_configured_or_sagemaker_model_dir(keys, env, kind, expected):
    assert paths(kind, env, **keys).model_dir == expected


def test_tier_one_checkpoints_go_to_local_disk_or_the_dir_sagemaker_syncs(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert paths().checkpoint_dir == f"{tmp_path}/llm_runtime/checkpoints"
    assert paths("sagemaker", SM, checkpoint__sagemaker_sync="true").checkpoint_dir == "/sm/checkpoints"
    assert paths(checkpoint__local_dir="/nvme/ck", checkpoint__sagemaker_sync="true").checkpoint_dir == "/nvme/ck"


def test_channels_come_from_their_variables_or_the_sagemaker_tree():
    got = job_paths(Config(), "sagemaker", {"SM_CHANNEL_TRAIN": "/data/train", **SM})
    assert got.channel_dir("train") == "/data/train"
    assert got.channel_dir("validation") == "/sm/input/data/validation"
    assert str(got.input_config_dir) == "/sm/input/config" and str(got.code_dir) == "/sm/code"


def test_a_worker_reads_its_paths_from_the_same_function_as_the_launcher(tmp_path, monkeypatch):
    """init() gives the worker rt.paths from job_paths on the same config and environment, and the
    watchdog writes failure records where rt.paths says (a world of one, no launcher)."""
    from llm_runtime import init

    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    config = load_config(cli=[("launch.cluster", "local")])
    rt = init(config)
    try:
        assert rt.paths == job_paths(config, rt.cluster.kind, dict(os.environ))
        assert rt.paths.output_dir == str(tmp_path / "out") and rt.paths.model_dir == str(tmp_path / "model")
        assert rt.watchdog.output_dir == rt.paths.output_dir
    finally:
        rt.shutdown()
