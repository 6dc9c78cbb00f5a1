"""Which data a job reads: ``data.uri`` resolved against the SageMaker input channels (pure)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .sources import parse_s3_uri

__all__ = ["DataLocation", "LocationError", "resolve_location"]


class LocationError(ValueError):
    """``data.uri`` names nothing readable; the message says what was looked at."""


@dataclass(frozen=True)
class DataLocation:
    kind: str
    """``bundled`` (no data: the bundled text), ``local`` (a directory) or ``s3``."""
    uri: str = ""
    channel: str = ""
    input_mode: str = ""
    """The channel's SageMaker input mode (``File``, ``FastFile``), empty outside channels."""

    @property
    def sequential(self) -> bool:
        """FastFile channels are S3 behind a file system: read sequentially, few files at once."""
        return self.input_mode == "FastFile"

    def describe(self) -> str:
        if self.kind == "bundled":
            return "the bundled text"
        where = f"channel {self.channel!r} ({self.input_mode or 'File'} mode) at " if self.channel else ""
        return f"{where}{self.uri}"


def _channels(env: Mapping[str, str], root: str | Path | None) -> dict[str, dict]:
    base = Path(root) if root is not None else Path(env.get("SAGEMAKER_BASE_DIR") or "/opt/ml")
    path = base / "input" / "config" / "inputdataconfig.json"
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise LocationError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(body, dict):
        raise LocationError(f"{path} must hold an object of channels")
    return {name: spec if isinstance(spec, dict) else {} for name, spec in body.items()}


def _channel(name: str, env: Mapping[str, str], root: str | Path | None, *, required: bool) -> DataLocation | None:
    channels = _channels(env, root)
    variable = f"SM_CHANNEL_{name.upper()}"
    if variable in env:
        path = env[variable]
    elif name in channels:
        base = Path(root) if root is not None else Path(env.get("SAGEMAKER_BASE_DIR") or "/opt/ml")
        path = str(base / "input" / "data" / name)
    elif required:
        known = sorted(set(channels) | {k[11:].lower() for k in env if k.startswith("SM_CHANNEL_")})
        raise LocationError(f"data.uri=channel:{name}: the job has no input channel {name!r} "
                            f"(channels: {', '.join(known) or 'none'})")
    else:
        return None
    mode = str(channels.get(name, {}).get("TrainingInputMode", "File"))
    if mode == "Pipe":
        raise LocationError(f"channel {name!r} uses Pipe input mode; use File or FastFile for token shards")
    return DataLocation(kind="local", uri=path, channel=name, input_mode=mode)


def resolve_location(uri: str, env: Mapping[str, str], sagemaker_root: str | Path | None = None) -> DataLocation:
    """``data.uri`` -> where to read: a path, s3://, channel:NAME, or (empty) the train channel / bundled text."""
    if uri.startswith("channel:"):
        return _channel(uri[len("channel:"):], env, sagemaker_root, required=True)
    if uri.startswith("s3://"):
        try:
            parse_s3_uri(uri)
        except ValueError as err:
            raise LocationError(f"data.uri: {err}") from None
        return DataLocation(kind="s3", uri=uri.rstrip("/"))
    if "://" in uri:
        raise LocationError(f"data.uri={uri!r}: only local paths, s3:// and channel:NAME are supported")
    if uri:
        return DataLocation(kind="local", uri=uri)
    return _channel("train", env, sagemaker_root, required=False) or DataLocation(kind="bundled")
