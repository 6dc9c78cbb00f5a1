"""What can be checked of docker/Dockerfile as text: the stages that need a CUDA base or the EFA
installer (which cannot be fetched here) parse and hold what a GPU host needs; the image bakes in no
network policy and no keys; tini runs the launcher; torch is the suite's. The CPU image itself is
built and run by tests/container."""
import json
import re
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


def stages(dockerfile) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM first)."""
    out, current = {}, None
    for name, args in dockerfile:
        if name == "FROM":
            current = args.split(" AS ")[-1].strip() if " AS " in args else args
            out[current] = []
        if current is not None:
            out[current].append((name, args))
    return out


def run_text(instructions) -> str:
    return " ".join(args for name, args in instructions if name == "RUN")


def test_the_dockerfile_has_a_cpu_and_a_gpu_system_and_one_runtime_stage_they_share(dockerfile):
    names = [name for name, _ in dockerfile]
    assert set(names) <= INSTRUCTIONS, set(names) - INSTRUCTIONS
    assert names[:names.index("FROM")] == ["ARG"] * names.index("FROM")
    by_stage = stages(dockerfile)
    assert list(by_stage) == ["system-cpu", "system-gpu", "runtime"]
    assert by_stage["system-cpu"][0][1].startswith("${CPU_BASE}") and by_stage["system-gpu"][0][1].startswith("${CUDA_BASE}")
    assert by_stage["runtime"][0][1] == "system-${FLAVOUR} AS runtime"
    defaults = dict(args.split("=", 1) for name, args in dockerfile[:names.index("FROM")])
    assert defaults["FLAVOUR"] == "cpu" and defaults["CUDA_BASE"].startswith("nvidia/cuda:")


def test_the_entrypoint_is_tini_then_the_runtimes_launcher(dockerfile):
    entry = [json.loads(args) for name, args in dockerfile if name == "ENTRYPOINT"]
    assert entry == [["tini", "--", "llm-runtime", "launch"]]  # exec form; no -g: SIGTERM goes to the launcher only
    setup = (REPO / "setup.py").read_text()
    assert '"llm-runtime=llm_runtime.cli:entry"' in setup
    by_stage = stages(dockerfile)
    assert all("tini" in run_text(by_stage[s]) for s in ("system-cpu", "system-gpu"))


def test_the_gpu_stage_brings_efa_mpi_and_ofi_nccl_and_no_image_bakes_network_variables_or_keys(dockerfile):
    env = " ".join(args for name, args in dockerfile if name == "ENV")
    assert not re.search(r"\b(NCCL_|FI_|TORCH_NCCL_|RDMAV_)", env), env  # decided at start by the runtime
    gpu = stages(dockerfile)["system-gpu"]
    assert "efa_installer.sh" in run_text(gpu) and "--skip-kmod" in run_text(gpu)
    gpu_env = " ".join(args for name, args in gpu if name == "ENV")
    assert "/opt/amazon/openmpi/bin" in gpu_env and "/opt/amazon/ofi-nccl/lib" in gpu_env
    everything = run_text(dockerfile)
    assert "openssh-server" in everything and "ssh-keygen" not in everything and "id_ed25519" not in everything
    for system in ("system-cpu", "system-gpu"):  # the package's postinst makes host keys: they go
        assert "/etc/ssh/ssh_host_*" in run_text(stages(dockerfile)[system]), system
    assert not any(name == "COPY" and ".ssh" in args for name, args in dockerfile)


def test_the_images_torch_is_the_suites_and_meets_the_floor(dockerfile):
    import torch
    from llm_runtime.launch import TORCH_FLOOR

    script = (REPO / "scripts" / "build_image.sh").read_text()
    image_torch = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([0-9.]+)\}"', script).group(1)
    assert image_torch == torch.__version__.split("+")[0]
    setup = (REPO / "setup.py").read_text()
    floor = re.search(r'"torch>=([0-9.]+)"', setup).group(1)
    assert tuple(int(x) for x in floor.split(".")) == TORCH_FLOOR
    assert Version(image_torch) in SpecifierSet(f">={floor}")


def test_the_images_python_and_extras_are_what_setup_py_offers(dockerfile, tmp_path):
    setup = (REPO / "setup.py").read_text()
    requires = SpecifierSet(re.search(r'python_requires="([^"]+)"', setup).group(1))
    assert "python3.11 -m venv" in run_text(stages(dockerfile)["system-gpu"])
    assert Version("3.11") in requires  # bookworm's python3 (the CPU image) is 3.11 too
    script = (REPO / "scripts" / "build_image.sh").read_text()
    for extras in re.findall(r'EXTRAS="\$\{EXTRAS:-([a-z0-9,]+)\}"', script):
        assert all(f'"{extra}":' in setup for extra in extras.split(",")), extras
    install = run_text(stages(dockerfile)["runtime"])
    assert "--no-index --find-links /tmp/wheelhouse /tmp/wheelhouse/*.whl" in install  # the dependencies' layer
    assert "--no-index --no-deps /tmp/app/*.whl" in install and "pip check" in install  # then llm-runtime alone
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[-2:] == ["*", "!.wheelhouse"]  # the build context is the wheelhouse alone
