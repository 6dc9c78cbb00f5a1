"""scripts/submit_sagemaker.py --dry-run: the CreateTrainingJob request, checked against botocore's own
SageMaker API model (no credentials, no network)."""
import json
import subprocess
import sys
from pathlib import Path

import botocore.session
import pytest
from botocore.validate import ParamValidator

from llm_runtime.metrics import metric_definitions

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "submit_sagemaker.py"
BASE = ["--image", "123456789012.dkr.ecr.us-west-2.amazonaws.com/llm-runtime:latest",
        "--role", "arn:aws:iam::123456789012:role/SageMakerRole", "--output-s3-uri", "s3://bucket/output"]


def submit(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env=env)


def validate(request):
    model = botocore.session.get_session().get_service_model("sagemaker")
    report = ParamValidator().validate(request, model.operation_model("CreateTrainingJob").input_shape)
    assert not report.has_errors(), report.generate_report()


def test_a_dry_run_prints_a_valid_request_with_metrics_retries_inputs_and_warm_pool():
    proc = submit(*BASE, "--instance-type", "ml.p5.48xlarge", "--instance-count", "4",
                  "--input", "train=s3://bucket/shards/:FastFile", "--input", "eval=s3://bucket/eval/",
                  "--checkpoint-s3-uri", "s3://bucket/ck", "--max-run", "86400", "--keep-alive", "1800",
                  "--hp", "train.steps=1000", "--hp", "parallel.tp=8", "--env", "NCCL_DEBUG=WARN",
                  "--job-name", "llama-8b-run1", "--dry-run", env={"PATH": "/usr/bin:/bin"})  # no AWS anything
    assert proc.returncode == 0, proc.stderr
    request = json.loads(proc.stdout)
    validate(request)
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == metric_definitions()
    assert request["RetryStrategy"] == {"MaximumRetryAttempts": 2}
    assert request["ResourceConfig"] == {"InstanceType": "ml.p5.48xlarge", "InstanceCount": 4, "VolumeSizeInGB": 500,
                                         "KeepAlivePeriodInSeconds": 1800}
    assert [(c["ChannelName"], c["InputMode"]) for c in request["InputDataConfig"]] == [("train", "FastFile"),
                                                                                       ("eval", "File")]
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400}
    # The runtime's own checkpoints (one object per node), configured through its hyperparameters.
    assert json.loads(request["HyperParameters"]["checkpoint.uri"]) == "s3://bucket/ck"
    assert json.loads(request["HyperParameters"]["train.steps"]) == "1000" and "CheckpointConfig" not in request
    assert request["Environment"] == {"NCCL_DEBUG": "WARN"} and request["TrainingJobName"] == "llama-8b-run1"


def test_sagemaker_checkpoint_sync_fsx_input_and_tensorboard_make_a_valid_request_too():
    proc = submit(*BASE, "--checkpoint-s3-uri", "s3://bucket/ck", "--checkpoint-mode", "sagemaker",
                  "--input", "train=fsx://fs-0123456789abcdef0/fsx/shards", "--subnets", "subnet-0abc",
                  "--security-groups", "sg-0abc", "--tensorboard-s3-uri", "s3://bucket/tb", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    request = json.loads(proc.stdout)
    validate(request)
    assert request["CheckpointConfig"] == {"S3Uri": "s3://bucket/ck", "LocalPath": "/opt/ml/checkpoints"}
    assert json.loads(request["HyperParameters"]["checkpoint.sagemaker_sync"]) == "true"
    assert request["InputDataConfig"][0]["DataSource"]["FileSystemDataSource"]["DirectoryPath"] == "/fsx/shards"
    assert request["TensorBoardOutputConfig"]["LocalPath"] == "/opt/ml/output/tensorboard"


@pytest.mark.parametrize("args,needle", [
    (["--input", "train=/local/path"], "the source must be s3://"),
    (["--input", "noequals"], "expected NAME=s3://"),
    (["--instance-type", "p5.48xlarge"], "start with 'ml.'"),
    (["--instance-count", "0"], "--instance-count must be >= 1"),
    (["--input", "train=fsx://fs-0123456789abcdef0/fsx/x"], "needs the job in the file system's VPC"),
    (["--hp", "novalue"], "--hp 'novalue': expected KEY=VALUE"),
    (["--job-name", "bad_name!"], "--job-name"),
    (["--subnets", "subnet-0abc"], "--subnets and --security-groups go together"),
    (["--retries", "31"], "--retries must be 0-30"),
])
def test_a_bad_flag_is_one_error_line_naming_it(args, needle):
    proc = submit(*BASE, *args, "--dry-run")
    assert proc.returncode == 2 and needle in proc.stderr and proc.stdout == "", proc.stderr


def test_a_secret_passed_as_environment_is_not_printed_by_the_dry_run():
    # Not in the submitting shell's environment: the key's name alone gets the value masked.
    proc = submit(*BASE, "--env", "AWS_SESSION_TOKEN=fakeSessionToken0123456789", "--env", "WANDB_API_KEY=wandb123456",
                  "--dry-run", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "fakeSessionToken0123456789" not in proc.stdout and "wandb123456" not in proc.stdout
    assert '"AWS_SESSION_TOKEN": "<redacted>"' in proc.stdout


def test_no_retries_means_no_retry_strategy_and_the_request_stays_valid():
    request = json.loads(submit(*BASE, "--retries", "0", "--dry-run").stdout)
    assert "RetryStrategy" not in request
    validate(request)
