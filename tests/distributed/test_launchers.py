"""Real launchers around llm_runtime.init: torchrun, mpirun and llm-runtime launch (gloo, CPU)."""
import json
import shutil
import time

import pytest

from tests.procs import BIN, PYTHON, REPO, clean_env, kill_tree, read_rank_reports, run

WORKER = str(REPO / "tests" / "workers" / "report.py")


def test_torchrun_workers_get_a_working_process_group(tmp_path):
    run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, str(tmp_path)],
        timeout=120)
    reports = read_rank_reports(tmp_path, 2)
    assert [r["sum"] for r in reports] == [3.0, 3.0]
    assert {r["kind"] for r in reports} == {"torchrun"}
    assert [r["local_rank"] for r in reports] == [0, 1]
    assert {r["backend"] for r in reports} == {"gloo"}


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed")
def test_plain_mpirun_four_ranks_are_detected_as_mpi_and_all_reduce(tmp_path):
    # No MASTER_ADDR/MASTER_PORT: a plain mpirun on one machine must just work.
    run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "4", PYTHON, WORKER, str(tmp_path)],
        timeout=180)
    reports = read_rank_reports(tmp_path, 4)
    assert {r["kind"] for r in reports} == {"mpi"}
    assert [r["sum"] for r in reports] == [10.0] * 4
    assert {r["world_size"] for r in reports} == {4}
    assert {r["env"]["MASTER_ADDR"] for r in reports} == {"127.0.0.1"}


def test_launch_runs_a_script_with_its_arguments_on_two_local_workers(tmp_path):
    proc = run([str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", WORKER, str(tmp_path), "--flag", "x"],
               timeout=120)
    reports = read_rank_reports(tmp_path, 2)
    assert [r["sum"] for r in reports] == [3.0, 3.0]
    assert reports[0]["argv"] == [str(tmp_path), "--flag", "x"]
    for secret in ("fake-secret-never-printed", "fake-session-token-never-printed"):
        assert secret not in proc.stdout + proc.stderr


def test_launch_exits_nonzero_when_one_worker_fails(tmp_path):
    proc = run([str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", WORKER, str(tmp_path),
                "--fail-rank", "1"], timeout=120, check=False)
    assert proc.returncode != 0
    assert "worker(s) failed" in proc.stderr


def test_a_rank_that_never_joins_a_collective_fails_the_job_after_the_train_timeout(tmp_path):
    env = clean_env(LLM_RUNTIME_COMM_TRAIN_TIMEOUT_S="5")
    started = time.monotonic()
    proc = run([str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", WORKER, str(tmp_path),
                "--hang-rank", "1"], env=env, timeout=120, check=False)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    report = json.loads((tmp_path / "rank-0.json").read_text())
    assert "Timed out" in report.get("traceback", ""), report  # gloo's timeout, not a hang
    assert elapsed < 100, f"the job took {elapsed:.0f}s to fail"  # bound, not a benchmark: 5 s timeout + teardown


def test_workers_die_with_a_killed_launcher_instead_of_living_on(tmp_path):
    import subprocess
    import time

    from tests.procs import descendants

    out = tmp_path / "reports"
    out.mkdir()
    proc = subprocess.Popen([str(BIN / "llm-runtime"), "launch", "--nproc-per-node", "2", WORKER, str(out),
                             "--hang-rank", "0"], env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        workers = []
        while len(workers) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "the workers never started"
            workers = [p for p in descendants(proc.pid) if "report.py" in _cmdline(p)]
            time.sleep(0.2)
        time.sleep(3)  # past init(), where the workers ask to die with their parent
        proc.kill()  # the launcher (torch.distributed.run in-process) dies without any cleanup
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived their launcher"
            time.sleep(0.2)
    finally:
        kill_tree(proc)
        proc.wait(timeout=30)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as handle:
            return handle.read().replace("\0", " ")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
