"""The main job end to end: llm-runtime train through the launcher, on CPU workers."""
import json
import math

import pytest


from tests.procs import BIN, REPO, clean_env, metrics, run

TINY = ["--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=64",
        "--train.batch_size=8", "--train.steps=4", "--train.log_every=1", "--train.warmup_steps=2"]


def train(tmp_path, name, *args, nproc=2, timeout=180):
    path = tmp_path / f"{name}.jsonl"
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", str(nproc), *TINY,
                f"--metrics.jsonl={path}", *args], timeout=timeout)
    return metrics(path), proc


def test_loss_curve_is_the_same_for_one_and_two_processes_and_with_accumulation(tmp_path):
    one, _ = train(tmp_path, "one", nproc=1)
    two, proc = train(tmp_path, "two", nproc=2)
    accumulated, _ = train(tmp_path, "acc", "--train.micro_batch_size=2", nproc=2)
    for curve in (one, two, accumulated):
        assert [m["step"] for m in curve] == [1, 2, 3, 4]
    for a, b, c in zip(one, two, accumulated):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["loss"], c["loss"], rel_tol=1e-4), (a, c)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)
    assert one[-1]["loss"] < one[0]["loss"]
    assert "rank 0/2" in proc.stdout and "step=4 loss=" in proc.stdout and "tokens_per_s=" in proc.stdout


def test_batch_that_does_not_divide_is_refused_before_any_worker_starts(tmp_path):
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "3", *TINY], timeout=60, check=False)
    assert proc.returncode == 2
    assert "train.batch_size=8" in proc.stderr and "3 data-parallel replicas" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr  # no worker was spawned


@pytest.mark.parametrize("nproc, args, needle", [
    (2, ["--parallel.tp=3"], "WORLD_SIZE=2 is not divisible by tp x pp = 3"),
    (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], "parallel.dp_replicate=2 x parallel.dp_shard=2"),
    (2, ["--parallel.tp=2", "--model.heads=1", "--model.dim=64"], "parallel.tp=2 must divide model.heads (1)"),
    (2, ["--parallel.pp=2", "--model.layers=1"], "the model has 1"),
], ids=["product-does-not-divide", "product-exceeds-world", "tp-larger-than-heads", "pp-larger-than-layers"])
def test_impossible_parallel_layout_is_refused_with_its_factors_before_any_worker(nproc, args, needle):
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", str(nproc), *TINY, *args],
               timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, no traceback, no workers


def test_the_wipe_drill_without_a_checkpoint_uri_is_refused_before_any_worker_and_deletes_nothing(tmp_path):
    local = tmp_path / "ck"
    (local / "run").mkdir(parents=True)
    (local / "run" / "keep.txt").write_text("the only copy")
    proc = run([str(BIN / "llm-runtime"), "train", "--nproc-per-node", "1", *TINY, f"--checkpoint.local_dir={local}",
                "--checkpoint.every_steps=2"], env=clean_env(LLM_RUNTIME_FAULT="wipe:rank=0,phase=launch"), timeout=60,
               check=False)
    assert proc.returncode == 2, proc.stderr
    assert "LLM_RUNTIME_FAULT='wipe:rank=0,phase=launch': wipe needs checkpoint.uri" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr and (local / "run" / "keep.txt").exists()


def test_demo_script_trains_the_bundled_model_to_completion(tmp_path):
    env = clean_env(LLM_RUNTIME_VENV=str(BIN.parent))
    proc = run([str(REPO / "scripts" / "demo.sh")], env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if "step=" in line and "loss=" in line]
    assert lines, proc.stdout
    losses = [float(line.split("loss=")[1].split()[0]) for line in lines]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns, not just runs
    assert "done steps=" in proc.stdout and "tokens_per_s=" in proc.stdout


def test_train_on_prepared_shards_with_a_tokenizer_json_sizes_the_model_to_its_vocabulary(tmp_path):
    from tests.datasets import write_bpe_tokenizer

    text = (REPO / "llm_runtime/models/data/bundled.txt").read_text()
    (tmp_path / "corpus.txt").write_text(text)
    tokenizer = write_bpe_tokenizer(tmp_path / "tokenizer.json", vocab_size=1200, texts=text.splitlines())
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    assert len(vocab) > 1000
    run([str(BIN / "llm-runtime"), "prepare-data", "--input", str(tmp_path / "corpus.txt"), "--output",
         str(tmp_path / "shards"), "--seq-len", "64", "--shard-size", "64KB", "--tokenizer", str(tokenizer)],
        timeout=120)
    curve, proc = train(tmp_path, "bpe", f"--data.uri={tmp_path / 'shards'}", "--train.steps=6")
    assert [m["step"] for m in curve] == [1, 2, 3, 4, 5, 6] and curve[-1]["loss"] < curve[0]["loss"]
    assert abs(curve[0]["loss"] - math.log(len(vocab))) < 0.4  # logits over the tokenizer's vocabulary, not 256
    assert f"data: {tmp_path / 'shards'}: " in proc.stderr + proc.stdout
