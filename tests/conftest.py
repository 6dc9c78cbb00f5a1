"""Fixtures for every test: a safe AWS environment, no leaked variables, no leaked groups."""
from __future__ import annotations

import hashlib
import os
import sys
import threading

import pytest

pytest_plugins = ["tests.s3server"]  # moto_server / s3 / s3_proxy fixtures (a real S3 server on 127.0.0.1)


@pytest.fixture(autouse=True)
def safe_aws_environment(monkeypatch):
    """Fake credentials and no instance-metadata lookups, for this test and its children.

    An AWS client without credentials reaches for the instance metadata address; these
    keep every client (boto3, s5cmd) local and make leaks of the fake secret detectable.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTFAKEKEY00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-never-printed-0123456789")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "fake-session-token-never-printed")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # DeepSpeed JIT-compiles a comm op on first use (25-50 s): keep it cached across tests and runs,
    # one cache per virtual environment (its include paths are in the build flags, so two checkouts
    # sharing one cache would rebuild it each time the other ran).
    venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.path.expanduser(f"~/.cache/llm_runtime/torch_extensions/{venv}"))
    yield


@pytest.fixture(autouse=True)
def no_leaked_environment():
    """Fail a test that changes os.environ without restoring it (monkeypatch restores)."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    # pytest sets PYTEST_CURRENT_TEST; torch's inductor sets its cache dir once, on first use.
    ignored = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and k not in ignored)
    if changed:
        os.environ.clear()
        os.environ.update(before)
        pytest.fail(f"test leaked environment variables: {changed}")


@pytest.fixture(autouse=True)
def no_leaked_process_group():
    yield
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("test left a torch.distributed process group initialised")


@pytest.fixture(autouse=True)
def restore_sigterm():
    """cli.main installs the launcher's SIGTERM handler in the process that calls it: not past a test."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a non-daemon thread running (it would keep the process alive)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for thread in leaked:  # a pool shut down with wait=False (transformers' weight loader) exits on its own
        thread.join(timeout=5)
    leaked = [t for t in leaked if t.is_alive()]
    if leaked:
        pytest.fail(f"test leaked threads: {[t.name for t in leaked]}")


@pytest.fixture(autouse=True)
def no_straggler_named(request):
    """Fail a test whose jobs (started with tests.procs.clean_env) named a straggler, unless it is
    marked ``stragglers_expected``: a clean run on two busy cores must raise no false alarm."""
    from tests.procs import STRAGGLERS

    before = STRAGGLERS.stat().st_size if STRAGGLERS.exists() else 0
    yield
    if not STRAGGLERS.exists() or STRAGGLERS.stat().st_size <= before:
        return
    with open(STRAGGLERS) as rows:
        rows.seek(before)
        named = rows.read()
    if request.node.get_closest_marker("stragglers_expected") is None:
        pytest.fail(f"a job of this test named a straggler (no drill slowed any rank):\n{named[:2000]}")
