#!/usr/bin/env python3
"""Submit an llm_runtime training job to SageMaker (CreateTrainingJob through boto3).

    python scripts/submit_sagemaker.py --image ACCOUNT.dkr.ecr.REGION.amazonaws.com/llm-runtime:latest \\
        --role arn:aws:iam::ACCOUNT:role/SageMakerRole --instance-type ml.p5.48xlarge --instance-count 2 \\
        --input train=s3://bucket/shards/:FastFile --checkpoint-s3-uri s3://bucket/checkpoints \\
        --output-s3-uri s3://bucket/output --hp train.steps=1000 --dry-run

``--dry-run`` prints the request and needs neither credentials nor a network. The request carries
the runtime's metric definitions (``llm-runtime metric-definitions``) and a retry strategy
(SageMaker retries a job that fails with an internal error). With ``--role`` missing and the
SageMaker Python SDK installed, the SDK supplies the execution role; the request is the same.
Hyperparameters ``section.key=value`` configure the built-in trainer (``llm-runtime train``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_runtime.metrics import metric_definitions  # noqa: E402
from llm_runtime.secrets import redact  # noqa: E402

INPUT_MODES = ("File", "FastFile", "Pipe")
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


class SubmitError(ValueError):
    """A bad flag; the message names it."""


def parse_input(text: str) -> dict:
    """``NAME=s3://bucket/prefix[:File|FastFile|Pipe]`` or ``NAME=fsx://fs-ID/mount/dir`` -> a channel."""
    name, eq, rest = text.partition("=")
    if not eq or not re.match(r"^[A-Za-z0-9\.\-_]{1,64}$", name):
        raise SubmitError(f"--input {text!r}: expected NAME=s3://bucket/prefix[:FastFile] or NAME=fsx://fs-id/mount/dir")
    mode = "File"
    if rest.rsplit(":", 1)[-1] in INPUT_MODES:
        rest, mode = rest.rsplit(":", 1)
    if rest.startswith("s3://") and len(rest) > 5:
        return {"ChannelName": name, "InputMode": mode,
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": rest,
                                                "S3DataDistributionType": "FullyReplicated"}}}
    match = re.match(r"^fsx://(fs-[0-9a-f]{8,21})(/.+)$", rest)
    if match:  # FSx for Lustre: mounted read-only at /opt/ml/input/data/NAME (needs --subnets)
        return {"ChannelName": name, "InputMode": "File",
                "DataSource": {"FileSystemDataSource": {"FileSystemId": match[1], "FileSystemAccessMode": "ro",
                                                        "FileSystemType": "FSxLustre", "DirectoryPath": match[2]}}}
    raise SubmitError(f"--input {text!r}: the source must be s3://bucket/prefix or fsx://fs-<id>/<mount>/<dir>")


def parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise SubmitError(f"{flag} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def build_request(args: argparse.Namespace) -> dict:
    """The CreateTrainingJob request (pure: no credentials, no network)."""
    name = args.job_name or f"llm-runtime-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _NAME.match(name):
        raise SubmitError(f"--job-name {name!r}: 1-63 letters, digits and hyphens")
    if args.instance_count < 1:
        raise SubmitError(f"--instance-count must be >= 1, got {args.instance_count}")
    if not args.instance_type.startswith("ml."):
        raise SubmitError(f"--instance-type {args.instance_type!r}: SageMaker types start with 'ml.'")
    if not args.output_s3_uri.startswith("s3://"):
        raise SubmitError(f"--output-s3-uri {args.output_s3_uri!r}: must be s3://bucket/prefix")
    channels = [parse_input(text) for text in args.input]
    if len({c["ChannelName"] for c in channels}) != len(channels):
        raise SubmitError("--input: each channel name once")
    hyper = parse_pairs(args.hp, "--hp")
    if args.checkpoint_s3_uri:
        if not args.checkpoint_s3_uri.startswith("s3://"):
            raise SubmitError(f"--checkpoint-s3-uri {args.checkpoint_s3_uri!r}: must be s3://bucket/prefix")
        if args.checkpoint_mode == "runtime":  # the runtime's own hierarchical uploads (one object per node)
            hyper.setdefault("checkpoint.uri", args.checkpoint_s3_uri)
        else:  # SageMaker syncs /opt/ml/checkpoints to the URI
            hyper.setdefault("checkpoint.sagemaker_sync", "true")
    request = {
        "TrainingJobName": name,
        "RoleArn": args.role,
        "AlgorithmSpecification": {"TrainingImage": args.image, "TrainingInputMode": "File",
                                   "MetricDefinitions": metric_definitions(),
                                   "EnableSageMakerMetricsTimeSeries": True},
        # SageMaker stores hyperparameters as strings; JSON-encoded, as its SDK does (the runtime decodes them).
        "HyperParameters": {key: json.dumps(value) for key, value in hyper.items()},
        "OutputDataConfig": {"S3OutputPath": args.output_s3_uri},
        "ResourceConfig": {"InstanceType": args.instance_type, "InstanceCount": args.instance_count,
                           "VolumeSizeInGB": args.volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": args.max_run},
        "Environment": parse_pairs(args.env, "--env"),
        "EnableNetworkIsolation": False,
    }
    if args.retries < 0 or args.retries > 30:
        raise SubmitError(f"--retries must be 0-30, got {args.retries}")
    if args.retries:  # SageMaker's minimum is 1: 0 means no RetryStrategy at all
        request["RetryStrategy"] = {"MaximumRetryAttempts": args.retries}
    if channels:
        request["InputDataConfig"] = channels
    if args.keep_alive:
        request["ResourceConfig"]["KeepAlivePeriodInSeconds"] = args.keep_alive
    if args.checkpoint_s3_uri and args.checkpoint_mode == "sagemaker":
        request["CheckpointConfig"] = {"S3Uri": args.checkpoint_s3_uri, "LocalPath": "/opt/ml/checkpoints"}
    if args.tensorboard_s3_uri:
        request["TensorBoardOutputConfig"] = {"S3OutputPath": args.tensorboard_s3_uri,
                                              "LocalPath": "/opt/ml/output/tensorboard"}
        request["HyperParameters"].setdefault("metrics.tensorboard", json.dumps("true"))
    if bool(args.subnets) != bool(args.security_groups):
        raise SubmitError("--subnets and --security-groups go together (a VPC job needs both)")
    if args.subnets or args.security_groups:
        request["VpcConfig"] = {"Subnets": args.subnets, "SecurityGroupIds": args.security_groups}
    elif any("FileSystemDataSource" in c["DataSource"] for c in channels):
        raise SubmitError("an fsx:// input needs the job in the file system's VPC: add --subnets and --security-groups")
    return request


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submit_sagemaker.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="the training image (docker/Dockerfile) in ECR")
    p.add_argument("--role", default="", help="execution role ARN (default: the SageMaker SDK's, when installed)")
    p.add_argument("--instance-type", default="ml.p5.48xlarge")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--volume-gb", type=int, default=500, help="EBS volume per instance")
    p.add_argument("--input", action="append", default=[], help="NAME=s3://bucket/prefix[:File|FastFile|Pipe] "
                   "or NAME=fsx://fs-ID/mount/dir (repeatable; the built-in trainer reads the 'train' channel)")
    p.add_argument("--output-s3-uri", required=True, help="where SageMaker puts model.tar.gz and output.tar.gz")
    p.add_argument("--checkpoint-s3-uri", default="")
    p.add_argument("--checkpoint-mode", choices=("runtime", "sagemaker"), default="runtime",
                   help="runtime: llm_runtime uploads one object per node itself (checkpoint.uri); "
                        "sagemaker: SageMaker syncs /opt/ml/checkpoints (CheckpointConfig)")
    p.add_argument("--tensorboard-s3-uri", default="")
    p.add_argument("--max-run", type=int, default=5 * 24 * 3600, help="MaxRuntimeInSeconds")
    p.add_argument("--keep-alive", type=int, default=0, help="warm pool: KeepAlivePeriodInSeconds (0 = none)")
    p.add_argument("--retries", type=int, default=2, help="RetryStrategy.MaximumRetryAttempts (internal errors)")
    p.add_argument("--hp", action="append", default=[], help="hyperparameter section.key=value (repeatable)")
    p.add_argument("--env", action="append", default=[], help="container environment KEY=VALUE (repeatable)")
    p.add_argument("--subnets", nargs="*", default=[])
    p.add_argument("--security-groups", nargs="*", default=[])
    p.add_argument("--job-name", default="")
    p.add_argument("--region", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the request; no credentials, no network")
    return p


def _sdk_role() -> str:
    try:
        from sagemaker import get_execution_role
    except ImportError:
        return ""
    try:
        return get_execution_role()
    except Exception:  # noqa: BLE001 - outside a SageMaker notebook the SDK cannot tell
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.role and not args.dry_run:
        args.role = _sdk_role()
    if not args.role:
        if not args.dry_run:
            print("submit_sagemaker.py: error: --role is required (the SageMaker SDK could not supply one)",
                  file=sys.stderr)
            return 2
        args.role = "arn:aws:iam::123456789012:role/REPLACE-ME"
    try:
        request = build_request(args)
    except SubmitError as err:
        print(f"submit_sagemaker.py: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(redact(json.dumps(request, indent=2)))
        return 0
    import boto3

    client = boto3.client("sagemaker", region_name=args.region)
    response = client.create_training_job(**request)
    print(f"submitted {request['TrainingJobName']}: {response['TrainingJobArn']}")
    print(f"logs: CloudWatch /aws/sagemaker/TrainingJobs, streams {request['TrainingJobName']}/algo-N-*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
