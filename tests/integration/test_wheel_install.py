"""The package as a user or an image gets it: a wheel built from this checkout, installed (not editable)
into a fresh virtual environment, runs a 2-process job with checkpoints from there.

Issue 13: llm_runtime/checkpoint/ had no __init__.py, find_packages left it out of the wheel and every
job from a wheel, ``pip install .`` or the image failed at start; the editable install of the suite
hid it. The fresh environment sees torch and the other requirements through a .pth line naming this
venv's site-packages: a plain path entry, so the .pth files in that directory (the editable install's
finder among them) are not processed and this checkout cannot be imported from it.
"""
import json
import shutil
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.procs import BIN, PYTHON, REPO, clean_env, metrics, run

pytestmark = pytest.mark.slow

# What setuptools reads when it builds; copied with llm_runtime/ (those that exist).
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in")
TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=32", "--train.batch_size=8",
        "--train.log_every=1", "--train.warmup_steps=2", "--parallel.mixed_precision=fp32",
        "--watchdog.first_timeout_s=150", "--watchdog.step_timeout_s=90"]


def source_files() -> set[str]:
    """Every file under llm_runtime/ that an install must carry (modules and data), as wheel names."""
    return {p.relative_to(REPO).as_posix() for p in (REPO / "llm_runtime").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def module_dirs() -> set[str]:
    """Every directory under llm_runtime/ (itself included) that holds modules: each must be a package."""
    root = REPO / "llm_runtime"
    return {d.relative_to(REPO).as_posix() for d in [root, *root.rglob("*")] if d.is_dir() and any(d.glob("*.py"))}


def module_names() -> list[str]:
    names = []
    for name in sorted(n for n in source_files() if n.endswith(".py")):
        parts = name[:-len(".py")].split("/")
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def fresh_env(env_dir: Path, **extra: str) -> dict[str, str]:
    """clean_env() with the fresh venv's bin/ on PATH instead of this one's, and no PYTHONPATH."""
    env = clean_env(**extra)
    path = [p for p in env["PATH"].split(":") if p and Path(p) != BIN]
    env["PATH"] = ":".join([str(env_dir / "bin"), *path])
    env["VIRTUAL_ENV"] = str(env_dir)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources: setuptools reuses an existing build/lib, so a stale one in the
    checkout could fill in a package the sources no longer make; and nothing is written into the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "llm_runtime", src / "llm_runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(root / "dist"), str(src)], timeout=120, env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    (found,) = (root / "dist").glob("llm_runtime-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed in it; the requirements come from this venv's
    site-packages, added after the install (so pip sees none of this venv's distributions)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    run([PYTHON, "-m", "venv", "--without-pip", str(env_dir)], timeout=120)  # no ensurepip: pip runs from here
    python = env_dir / "bin" / "python"
    run([PYTHON, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        timeout=120, env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    timeout=60, env=fresh_env(env_dir)).stdout.strip())
    assert site.is_relative_to(env_dir), site
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_llm_runtime_test_requirements.pth").write_text("".join(f"{p}\n" for p in ours))
    return env_dir


def test_the_wheel_holds_every_package_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing_inits = sorted(f"{d}/__init__.py" for d in module_dirs() if f"{d}/__init__.py" not in names)
    assert not missing_inits, f"directories of modules that are no package, so no install has them: {missing_inits}"
    assert sorted(source_files() - names) == []
    assert "llm_runtime/models/data/bundled.txt" in names  # package_data
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "llm-runtime = llm_runtime.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_module_resolves_to_the_installed_copy_not_this_checkout(venv, tmp_path):
    """find_spec, not import, for each module: it imports the packages above it and finds the file."""
    probe = ("import importlib.util, json, sys\n"
             "out = {}\n"
             "for name in json.loads(sys.argv[1]):\n"
             "    try:\n"
             "        out[name] = importlib.util.find_spec(name).origin\n"
             "    except ImportError as err:\n"
             "        out[name] = f'{type(err).__name__}: {err}'\n"
             "print(json.dumps(out))\n")
    found = json.loads(run([str(venv / "bin" / "python"), "-c", probe, json.dumps(module_names())], timeout=120,
                           env=fresh_env(venv), cwd=tmp_path).stdout)
    elsewhere = {name: origin for name, origin in found.items() if not str(origin).startswith(str(venv))}
    assert not elsewhere, elsewhere


def test_a_two_process_job_with_checkpoints_runs_and_resumes_from_the_installed_wheel(venv, tmp_path):
    work = tmp_path / "cwd"  # outside the checkout: `python -m` puts the cwd first on sys.path
    work.mkdir()
    uri, local = tmp_path / "uri", tmp_path / "local"

    def train(name, steps):
        argv = [str(venv / "bin" / "llm-runtime"), "train", "--nproc-per-node", "2", *TINY, f"--train.steps={steps}",
                "--checkpoint.every_steps=2", f"--checkpoint.uri={uri}", f"--checkpoint.local_dir={local}",
                f"--train.model_dir={tmp_path / name / 'model'}", f"--metrics.jsonl={tmp_path / name}.jsonl"]
        proc = run(argv, timeout=120, env=fresh_env(venv), cwd=work)
        out = proc.stdout + proc.stderr
        (tmp_path / f"{name}.out").write_text(out)  # kept for a failure's diagnosis
        assert str(REPO / "llm_runtime") not in out  # no traceback or warning from this checkout's files
        return [m["step"] for m in metrics(tmp_path / f"{name}.jsonl")], out

    steps, _ = train("first", 4)
    assert steps == [1, 2, 3, 4]
    manifests = sorted(p.relative_to(uri).as_posix() for p in uri.rglob("manifest.json"))
    assert [m.split("/")[-2] for m in manifests] == ["step-000000002", "step-000000004"], manifests
    for m in manifests:  # each step's node object, under the spread prefix: <run>/s00/step-N/node-00000-<t>.tar
        run_dir, step = m.split("/")[:2]
        assert list((uri / run_dir / "s00" / step).glob("node-00000-*.tar")), sorted(uri.rglob("*"))
    assert (tmp_path / "first" / "model" / "model.safetensors.index.json").is_file()

    steps, out = train("resumed", 6)
    assert "resumed from checkpoint step 4" in out
    assert steps == [5, 6]
