"""Which data a job reads: ``data.uri`` resolved against the SageMaker input channels (pure)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..paths import JobPaths
from ..storage import parse_s3_uri

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


def _channels(paths: JobPaths) -> dict[str, dict]:
    path = paths.input_config_dir / "inputdataconfig.json"
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise LocationError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(body, dict):
        raise LocationError(f"{path} must hold an object of channels")
    return {name: spec if isinstance(spec, dict) else {} for name, spec in body.items()}


def _channel(name: str, paths: JobPaths, *, required: bool) -> DataLocation | None:
    channels = _channels(paths)
    if name.lower() in paths.channel_dirs or name in channels:
        path = paths.channel_dir(name)
    elif required:
        known = sorted(set(channels) | set(paths.channel_dirs))
        raise LocationError(f"data.uri=channel:{name}: the job has no input channel {name!r} "
                            f"(channels: {', '.join(known) or 'none'})")
    else:
        return None
    mode = str(channels.get(name, {}).get("TrainingInputMode", "File"))
    if mode == "Pipe":
        raise LocationError(f"channel {name!r} uses Pipe input mode; use File or FastFile for token shards")
    return DataLocation(kind="local", uri=path, channel=name, input_mode=mode)


def resolve_location(uri: str, paths: JobPaths) -> DataLocation:
    """``data.uri`` -> where to read: a path, s3://, channel:NAME, or (empty) the train channel / bundled text."""
    if uri.startswith("channel:"):
        return _channel(uri[len("channel:"):], paths, required=True)
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
    return _channel("train", paths, required=False) or DataLocation(kind="bundled")
