"""Hostile input stays data: no unpickling loads in the runtime, hyperparameters never evaluated."""
import json
import re
from pathlib import Path

import pytest

from llm_runtime.cluster.sagemaker import read_hyperparameters
from llm_runtime.config import ConfigError, load_config

PACKAGE = Path(__file__).resolve().parents[2] / "llm_runtime"
UNSAFE = [
    (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.loads?\(|\bimport pickle\b|\bcloudpickle\b|\bdill\b"), "pickle"),
    (re.compile(r"allow_pickle=True"), "numpy allow_pickle=True"),
    (re.compile(r"(?<![\w.])eval\(|(?<![\w.])exec\("), "eval/exec"),
    (re.compile(r"yaml\.load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
]


def test_the_runtime_never_loads_with_pickle_eval_or_unsafe_torch_load():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in UNSAFE:
                if pattern.search(line):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_audit_itself_catches_each_unsafe_form():
    lines = ["state = torch.load(path)", "import pickle", "np.load(f, allow_pickle=True)", "x = eval(text)",
             "yaml.load(stream)"]
    assert all(any(p.search(line) for p, _ in UNSAFE) for line in lines)
    assert not any(p.search("torch.load(path, weights_only=True)") for p, _ in UNSAFE)


@pytest.mark.parametrize("value", ["__import__('os').system('touch /tmp/pwned')", "{{7*7}}", "$(reboot)"])
def test_hyperparameters_are_parsed_as_data_and_never_evaluated(tmp_path, value):
    config_dir = tmp_path / "input" / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "hyperparameters.json").write_text(json.dumps({"checkpoint.run_id": json.dumps(value),
                                                                 "train.steps": json.dumps(value)}))
    hyper = read_hyperparameters({"SAGEMAKER_BASE_DIR": str(tmp_path)}, root=tmp_path)
    assert hyper["checkpoint.run_id"] == value  # a string, as given
    with pytest.raises(ConfigError, match=r"train.steps=.* \(from SageMaker hyperparameters.json\): expects an integer"):
        load_config(hyperparameters=hyper)
