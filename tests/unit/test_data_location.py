"""data.uri -> where the job reads: paths, s3://, SageMaker channels and their input modes."""
import json

import pytest

from llm_runtime.config import Config
from llm_runtime.data.location import LocationError, resolve_location
from llm_runtime.paths import job_paths


def at(env, root):
    """The job's paths with SageMaker's tree at ``root`` and the channel variables in ``env``."""
    return job_paths(Config(), "sagemaker", {**env, "SAGEMAKER_BASE_DIR": str(root)})


@pytest.fixture
def root(tmp_path):
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (config / "inputdataconfig.json").write_text(json.dumps({
        "train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"},
        "fast": {"TrainingInputMode": "FastFile"},
        "piped": {"TrainingInputMode": "Pipe"},
    }))
    return tmp_path


@pytest.mark.parametrize("uri,env,kind,where,mode", [
    ("", {}, "local", "{root}/input/data/train", "File"),
    ("", {"SM_CHANNEL_TRAIN": "/mnt/fsx/tokens"}, "local", "/mnt/fsx/tokens", "File"),
    ("channel:fast", {}, "local", "{root}/input/data/fast", "FastFile"),
    ("channel:extra", {"SM_CHANNEL_EXTRA": "/data/x"}, "local", "/data/x", "File"),
    ("s3://my-bucket/tokens/v1/", {}, "s3", "s3://my-bucket/tokens/v1", ""),
    ("/fsx/tokens", {}, "local", "/fsx/tokens", ""),
])
def test_data_uri_resolves_to_a_path_a_bucket_or_a_channel(root, uri, env, kind, where, mode):
    location = resolve_location(uri, at(env, root))
    assert (location.kind, location.uri, location.input_mode) == (kind, where.format(root=root), mode)


def test_without_a_train_channel_or_a_uri_the_bundled_text_is_used(tmp_path):
    assert resolve_location("", at({}, tmp_path)).kind == "bundled"


@pytest.mark.parametrize("uri,needle", [
    ("channel:valid", "no input channel 'valid' \\(channels: fast, piped, train\\)"),
    ("channel:piped", "Pipe input mode"),
    ("s3://x/y", "not a valid S3 bucket name"),
    ("s3://bucket/a/../b", "may not contain"),
    ("https://example.com/data", "only local paths, s3:// and channel:NAME"),
])
def test_a_data_uri_that_names_nothing_usable_says_what_exists(root, uri, needle):
    with pytest.raises(LocationError, match=needle):
        resolve_location(uri, at({}, root))


def test_a_malformed_inputdataconfig_is_named(tmp_path):
    path = tmp_path / "input" / "config" / "inputdataconfig.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(LocationError, match="inputdataconfig.json is not readable JSON"):
        resolve_location("", at({}, tmp_path))
