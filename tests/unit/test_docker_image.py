"""What can be checked of docker/Dockerfile without a Docker engine (none exists here): it parses,
its ENTRYPOINT is the runtime's, it bakes in no network policy, and the package builds and installs
for the image's Python version."""
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "ENTRYPOINT", "CMD", "EXPOSE", "LABEL",
                "USER", "SHELL", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    assert not pending, "the file ends inside a continued instruction"
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((REPO / "docker" / "Dockerfile").read_text())


def test_the_dockerfile_parses_into_known_instructions_with_one_base(dockerfile):
    names = [name for name, _ in dockerfile]
    assert set(names) <= INSTRUCTIONS, set(names) - INSTRUCTIONS
    assert names[:names.index("FROM")] == ["ARG"] * names.index("FROM") and names.count("FROM") == 1


def test_the_entrypoint_is_the_runtimes_launcher(dockerfile):
    entry = [json.loads(args) for name, args in dockerfile if name == "ENTRYPOINT"]
    assert entry == [["llm-runtime", "launch"]]  # exec form: signals reach the launcher directly
    setup = (REPO / "setup.py").read_text()
    assert '"llm-runtime=llm_runtime.cli:entry"' in setup


def test_the_image_bakes_in_no_network_variables_and_carries_mpi_and_sshd(dockerfile):
    env = " ".join(args for name, args in dockerfile if name == "ENV")
    assert not re.search(r"\b(NCCL_|FI_|TORCH_NCCL_|RDMAV_)", env), env  # decided at start by the runtime
    run = " ".join(args for name, args in dockerfile if name == "RUN")
    assert "openssh-server" in run and "ssh-keygen -A" in run and "efa_installer.sh" in run
    assert "/opt/amazon/openmpi/bin" in env


def test_the_package_builds_and_installs_for_the_images_python(dockerfile, tmp_path):
    run = " ".join(args for name, args in dockerfile if name == "RUN")
    python = re.search(r"\bpython(3\.\d+) -m venv", run)
    assert python, "the image makes its venv with a versioned python3.X"
    setup = (REPO / "setup.py").read_text()
    requires = SpecifierSet(re.search(r'python_requires="([^"]+)"', setup).group(1))
    assert Version(python.group(1)) in requires
    args = {m.group(1): m.group(2) for m in re.finditer(r"ARG (\w+)=(\S+)", "\n".join(
        f"ARG {a}" for n, a in dockerfile if n == "ARG"))}
    torch_requirement = SpecifierSet(re.search(r'"torch(>=[^"]+)"', setup).group(1))
    assert Version(args["TORCH_VERSION"]) in torch_requirement
    copy = next(i for i, (n, a) in enumerate(dockerfile) if n == "COPY" and a.endswith("/opt/llm_runtime"))
    install = next(i for i, (n, a) in enumerate(dockerfile) if n == "RUN" and "/opt/llm_runtime[" in a)
    assert copy < install
    extras = re.search(r"/opt/llm_runtime\[([^\]]+)\]", dockerfile[install][1]).group(1).split(",")
    assert all(f'"{extra}":' in setup for extra in extras), extras
    if f"{sys.version_info.major}.{sys.version_info.minor}" != python.group(1):
        pytest.skip(f"this Python is not the image's {python.group(1)}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("llm_runtime-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "llm_runtime/cli.py" in names and "llm_runtime/models/data/" in " ".join(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "llm-runtime = llm_runtime.cli:entry" in entry_points
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    found = subprocess.run([sys.executable, "-c", "import llm_runtime.cli; print(llm_runtime.cli.__file__)"],
                           env={"PYTHONPATH": str(site), "PATH": ""}, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, check=True).stdout.strip()
    assert found.startswith(str(site))  # the installed copy, not this checkout
