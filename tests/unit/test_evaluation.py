"""[eval]: which data, how many batches, which rows each replica reads, and every refusal."""
import re

import pytest

from llm_runtime.config import Config, ConfigError
from llm_runtime.evaluation import EvalReader, _eval_steps, plan_eval
from llm_runtime.paths import job_paths
from tests.datasets import sample_ids, write_dataset


def config(**eval_keys) -> Config:
    cfg = Config()
    cfg.train.seq_len, cfg.train.batch_size = 16, 4
    for key, value in eval_keys.items():
        setattr(cfg.eval, key, value)
    return cfg


def paths(tmp_path, **env):
    return job_paths(Config(), "", {"SM_TRAINING_ENV": "", "SAGEMAKER_BASE_DIR": str(tmp_path / "ml"), **env})


@pytest.mark.parametrize("steps,samples,total,expected", [
    (0, 0, 17, 4),   # every whole batch of 4
    (2, 0, 17, 2),
    (0, 8, 17, 2),
    (4, 0, 16, 4),
])
def test_eval_batches_come_from_steps_or_samples_or_the_whole_set(steps, samples, total, expected):
    assert _eval_steps(steps, samples, 4, total, "eval.data_uri (x)") == expected


@pytest.mark.parametrize("steps,samples,total,needle", [
    (2, 8, 17, "set eval.steps (2) or eval.samples (8), not both"),
    (0, 6, 17, "eval.samples=6 is not a multiple of train.batch_size=4"),
    (5, 0, 17, "has 17 samples: fewer than 5 eval batch(es) of train.batch_size=4"),
    (0, 0, 3, "has 3 samples: fewer than 1 eval batch(es)"),
])
def test_an_eval_size_that_does_not_fit_is_refused_naming_the_keys(steps, samples, total, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _eval_steps(steps, samples, 4, total, "eval.data_uri (x)")


def test_no_eval_data_means_no_evaluation_unless_one_was_asked_for(tmp_path):
    assert plan_eval(config(), 1, paths(tmp_path)) is None
    with pytest.raises(ConfigError, match="eval.every_steps .* there is no eval data: set eval.data_uri or give the "
                                          "job a 'validation' channel"):
        plan_eval(config(every_steps=10), 1, paths(tmp_path))


def test_the_validation_channel_is_the_default_eval_data(tmp_path):
    write_dataset(tmp_path / "validation", [9, 8])
    plan = plan_eval(config(), 2, paths(tmp_path, SM_CHANNEL_VALIDATION=str(tmp_path / "validation")))
    assert plan.location.channel == "validation" and (plan.steps, plan.batch) == (4, 4)
    assert "channel 'validation'" in plan.describe() and "4 batches of 4 sequences (16 of its 17 samples)" in plan.describe()


@pytest.mark.parametrize("change,needle", [
    (dict(seq_len=32), "holds sequences of 16 tokens (index.json seq_len) but train.seq_len=32"),
    (dict(vocab=300), "vocabulary of 256 (index.json vocab_size, tokenizer 'byte') but the training data's has 300"),
    (dict(uri="ftp://host/x"), "eval.data_uri='ftp://host/x': only local paths, s3:// and channel:NAME"),
    (dict(uri="missing"), "eval.data_uri ("),
    (dict(uri="channel:heldout"), "eval.data_uri=channel:heldout: the job has no input channel 'heldout'"),
])
def test_eval_data_that_does_not_match_the_job_is_refused_naming_the_key_and_the_data(tmp_path, change, needle):
    write_dataset(tmp_path / "heldout", [9, 8])
    cfg = config(data_uri=change.get("uri", str(tmp_path / "heldout")))
    cfg.train.seq_len = change.get("seq_len", 16)
    with pytest.raises(ConfigError) as err:
        plan_eval(cfg, 1, paths(tmp_path), vocab_size=change.get("vocab", 256))
    assert needle in str(err.value)


def test_each_replica_reads_its_own_contiguous_rows_and_together_they_are_the_one_rank_order(tmp_path):
    write_dataset(tmp_path / "heldout", [5, 3, 9])  # batches cross shard boundaries
    plan = plan_eval(config(data_uri=str(tmp_path / "heldout")), 1, paths(tmp_path))
    assert plan.steps == 4
    one = [sample_ids(EvalReader(plan, 0, 1).rows(b).numpy()) for b in range(plan.steps)]
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    for dp in (2, 4):
        readers = [EvalReader(plan, r, dp) for r in range(dp)]
        assert [sum((sample_ids(reader.rows(b).numpy()) for reader in readers), []) for b in range(plan.steps)] == one
    rows = EvalReader(plan, 0, 1).rows(1)
    assert rows.shape == (4, 17) and str(rows.dtype) == "torch.int64"
