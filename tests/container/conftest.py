"""The CPU image, built once per run with scripts/build_image.sh (the base bootstrapped from Debian
packages: no registry is reachable here), shared by every container test."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.procs import REPO

TAG = "llm-runtime:test"


@pytest.fixture(scope="session")
def image() -> str:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True,
                                                         timeout=60).returncode != 0:
        pytest.fail("docker is not running: scripts/test.sh installs Docker and starts dockerd")
    env = {**os.environ, "LLM_RUNTIME_NO_REGISTRY": "1"}  # never reach for a registry from the suite
    build = subprocess.run([str(REPO / "scripts" / "build_image.sh"), "cpu", TAG], env=env, capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, build.stdout + build.stderr
    print(build.stdout)
    return TAG
