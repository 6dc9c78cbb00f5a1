"""Configuration loading: precedence, typed coercion and error messages (llm_runtime.config)."""
from __future__ import annotations

import pytest

from llm_runtime.cluster import sagemaker as sm
from llm_runtime.config import Config, ConfigError, load_config, parse_cli_overrides, to_dict, validate


def write_toml(tmp_path, text: str, name: str = "job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_apply_when_nothing_is_given():
    config = load_config()
    assert to_dict(config) == to_dict(Config())
    assert config.train.lr_schedule == "cosine"
    assert config.launch.cluster == ""


# ------------------------------------------------------------------ precedence

LAYERS = ("toml", "env", "hyper", "cli")
PRECEDENCE_CASES = [
    # (id, layers that set train.steps, expected winner)
    ("default-only", (), 30),
    ("toml-beats-default", ("toml",), 11),
    ("env-beats-toml", ("toml", "env"), 22),
    ("hyperparameters-beat-env", ("toml", "env", "hyper"), 33),
    ("cli-beats-everything", ("toml", "env", "hyper", "cli"), 44),
    ("cli-beats-toml-alone", ("toml", "cli"), 44),
    ("hyperparameters-beat-toml", ("toml", "hyper"), 33),
    ("env-alone", ("env",), 22),
]


@pytest.mark.parametrize("layers, steps", [c[1:] for c in PRECEDENCE_CASES], ids=[c[0] for c in PRECEDENCE_CASES])
def test_config_precedence_defaults_toml_env_hyperparameters_cli(layers, steps, tmp_path):
    toml = write_toml(tmp_path, "[train]\nsteps = 11\n") if "toml" in layers else None
    env = {"LLM_RUNTIME_TRAIN_STEPS": "22"} if "env" in layers else {}
    hyper = {"train.steps": 33} if "hyper" in layers else {}
    cli = [("train.steps", "44")] if "cli" in layers else []
    config = load_config(toml_path=toml, env=env, hyperparameters=hyper, cli=cli)
    assert config.train.steps == steps


def test_each_source_sets_its_own_keys_without_clobbering_others(tmp_path):
    toml = write_toml(tmp_path, '[train]\nsteps = 11\nlr = 0.5\n[model]\ndim = 64\n')
    config = load_config(
        toml_path=toml,
        env={"LLM_RUNTIME_TRAIN_LR_SCHEDULE": "constant", "LLM_RUNTIME_MODEL_LAYERS": "2"},
        hyperparameters={"train.seed": 7, "dist.backend": "gloo"},
        cli=[("launch.max_restarts", "3")],
    )
    assert (config.train.steps, config.train.lr, config.model.dim) == (11, 0.5, 64)
    assert config.train.lr_schedule == "constant" and config.model.layers == 2
    assert config.train.seed == 7 and config.dist.backend == "gloo"
    assert config.launch.max_restarts == 3


@pytest.mark.parametrize("name, value, attr, expected", [
    ("LLM_RUNTIME_TRAIN_LR_SCHEDULE", "constant", ("train", "lr_schedule"), "constant"),
    ("LLM_RUNTIME_TRAIN_MIN_LR_RATIO", "0.25", ("train", "min_lr_ratio"), 0.25),
    ("LLM_RUNTIME_LAUNCH_MAX_RESTARTS", "2", ("launch", "max_restarts"), 2),
    ("LLM_RUNTIME_LAUNCH_MPI", "yes", ("launch", "mpi"), True),
    ("LLM_RUNTIME_COMM_INIT_TIMEOUT_S", "60", ("comm", "init_timeout_s"), 60.0),
    ("LLM_RUNTIME_NETENV_EFA", "off", ("netenv", "efa"), "off"),
])
def test_environment_variable_sets_section_key_with_underscores(name, value, attr, expected):
    config = load_config(env={name: value})
    assert getattr(getattr(config, attr[0]), attr[1]) == expected


def test_environment_variables_of_other_programs_are_ignored():
    config = load_config(env={"PATH": "/bin", "LLM_RUNTIME_FOO_BAR": "1", "TRAIN_STEPS": "3",
                              "LLM_RUNTIME_": "x"})
    assert to_dict(config) == to_dict(Config())


# ------------------------------------------------------------------ hyperparameters


def test_sagemaker_hyperparameters_file_sets_config_and_skips_sagemaker_keys(sagemaker_tree):
    root = sagemaker_tree(["algo-1"], "algo-1", raw_hyperparameters={
        "train.steps": "5",
        "train.lr": "0.01",
        "train.lr_schedule": '"constant"',
        "launch.mpi": "true",
        "sagemaker_program": '"train.py"',
        "sagemaker_region": '"us-west-2"',
        "sagemaker_distribution_instance_groups": '["gpu"]',
    })
    hyper = sm.read_hyperparameters({}, root)
    assert hyper["train.steps"] == 5 and hyper["sagemaker_program"] == "train.py"
    config = load_config(hyperparameters=hyper)
    assert (config.train.steps, config.train.lr, config.train.lr_schedule) == (5, 0.01, "constant")
    assert config.launch.mpi is True


@pytest.mark.parametrize("strict", [True, False])
def test_sagemaker_prefixed_hyperparameters_are_never_config(strict):
    config = load_config(hyperparameters={"sagemaker_program": "train.py", "sagemaker_submit_directory": "s3://b/k",
                                          "sagemaker_mpi_enabled": True}, strict_hyperparameters=strict)
    assert to_dict(config) == to_dict(Config())


def test_strict_hyperparameters_reject_unknown_keys():
    with pytest.raises(ConfigError, match=r"epochs.*hyperparameters"):
        load_config(hyperparameters={"epochs": 3})


def test_non_strict_hyperparameters_ignore_keys_of_unknown_sections():
    config = load_config(hyperparameters={"epochs": 3, "optimizer.name": "adam", "train.steps": 9},
                         strict_hyperparameters=False)
    assert config.train.steps == 9


def test_non_strict_hyperparameters_still_reject_unknown_key_in_known_section():
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(hyperparameters={"train.stepz": 9}, strict_hyperparameters=False)


# ------------------------------------------------------------------ coercion

COERCE_CASES = [
    # (id, key, raw value, attribute path, expected)
    ("int-from-string", "train.steps", "12", ("train", "steps"), 12),
    ("int-from-integral-float", "train.steps", 12.0, ("train", "steps"), 12),
    ("float-from-string", "train.lr", "1e-4", ("train", "lr"), 1e-4),
    ("float-from-int", "train.lr", 1, ("train", "lr"), 1.0),
    ("bool-true-word", "launch.mpi", "true", ("launch", "mpi"), True),
    ("bool-yes", "launch.mpi", "Yes", ("launch", "mpi"), True),
    ("bool-on", "launch.mpi", "on", ("launch", "mpi"), True),
    ("bool-one", "launch.mpi", "1", ("launch", "mpi"), True),
    ("bool-false-word", "launch.mpi", "FALSE", ("launch", "mpi"), False),
    ("bool-no", "launch.mpi", "no", ("launch", "mpi"), False),
    ("bool-off", "launch.mpi", "off", ("launch", "mpi"), False),
    ("bool-zero", "launch.mpi", "0", ("launch", "mpi"), False),
    ("str-stays-str", "netenv.nccl_version", "2.21.5", ("netenv", "nccl_version"), "2.21.5"),
    ("choice-cluster", "launch.cluster", "mpi", ("launch", "cluster"), "mpi"),
    ("choice-backend", "dist.backend", "nccl", ("dist", "backend"), "nccl"),
]


@pytest.mark.parametrize("key, raw, attr, expected", [c[1:] for c in COERCE_CASES], ids=[c[0] for c in COERCE_CASES])
def test_command_line_values_are_coerced_to_the_key_type(key, raw, attr, expected):
    config = load_config(cli=[(key, raw)])
    value = getattr(getattr(config, attr[0]), attr[1])
    assert value == expected and type(value) is type(expected)


BAD_VALUE_CASES = [
    # (id, key, bad value)
    ("int-word", "train.steps", "ten"),
    ("int-fraction", "train.steps", "1.5"),
    ("float-word", "train.lr", "fast"),
    ("bool-word", "launch.mpi", "maybe"),
    ("choice-lr-schedule", "train.lr_schedule", "linear"),
    ("choice-backend", "dist.backend", "mpi"),
    ("choice-cluster", "launch.cluster", "slurm"),
    ("choice-efa", "netenv.efa", "maybe"),
]
SOURCES = ["toml", "env", "hyper", "cli"]


def _load_from(source: str, key: str, value, tmp_path):
    """load_config with ``key=value`` given by one source; returns the text that names that source."""
    section, _, name = key.partition(".")
    if source == "toml":
        path = write_toml(tmp_path, f'[{section}]\n{name} = "{value}"\n')
        return (lambda: load_config(toml_path=path)), str(path)
    if source == "env":
        var = f"LLM_RUNTIME_{section.upper()}_{name.upper()}"
        return (lambda: load_config(env={var: str(value)})), var
    if source == "hyper":
        return (lambda: load_config(hyperparameters={key: value})), "hyperparameters"
    return (lambda: load_config(cli=[(key, str(value))])), "command line"


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("key, value", [c[1:] for c in BAD_VALUE_CASES], ids=[c[0] for c in BAD_VALUE_CASES])
def test_bad_value_error_names_the_key_and_where_it_came_from(source, key, value, tmp_path):
    load, where = _load_from(source, key, value, tmp_path)
    with pytest.raises(ConfigError) as err:
        load()
    message = str(err.value)
    assert key in message
    assert where in message
    assert value in message


@pytest.mark.parametrize("source", SOURCES)
def test_unknown_key_error_names_the_key_and_where_it_came_from(source, tmp_path):
    load, where = _load_from(source, "train.stepz", "3", tmp_path)
    with pytest.raises(ConfigError) as err:
        load()
    assert "train.stepz" in str(err.value) and where in str(err.value)


@pytest.mark.parametrize("text", [
    pytest.param("[train\nsteps = 3\n", id="unclosed-table"),
    pytest.param("[train]\nsteps = \n", id="missing-value"),
    pytest.param("[train]\nsteps = 3\nsteps = 4\n", id="duplicate-key"),
])
def test_invalid_toml_error_names_the_file(text, tmp_path):
    path = write_toml(tmp_path, text, name="broken.toml")
    with pytest.raises(ConfigError, match="TOML") as err:
        load_config(toml_path=path)
    assert str(path) in str(err.value)


def test_missing_config_file_error_names_the_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as err:
        load_config(toml_path=path)
    assert str(path) in str(err.value)


def test_toml_top_level_value_outside_a_section_is_an_error_naming_the_file(tmp_path):
    path = write_toml(tmp_path, "steps = 3\n")
    with pytest.raises(ConfigError, match="steps") as err:
        load_config(toml_path=path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ command line parsing

CLI_CASES = [
    ("equals-form", ["--train.steps=7"], [("train.steps", "7")]),
    ("space-form", ["--train.steps", "7"], [("train.steps", "7")]),
    ("mixed-forms-keep-order", ["--train.lr", "0.1", "--model.dim=64", "--train.lr=0.2"],
     [("train.lr", "0.1"), ("model.dim", "64"), ("train.lr", "0.2")]),
    ("value-with-equals-sign", ["--netenv.nccl_version=a=b"], [("netenv.nccl_version", "a=b")]),
    ("negative-value-as-next-arg", ["--train.seed", "-5"], [("train.seed", "-5")]),
    ("nothing", [], []),
]


@pytest.mark.parametrize("args, pairs", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_command_line_overrides_parse_both_forms(args, pairs):
    assert parse_cli_overrides(args) == pairs


@pytest.mark.parametrize("args, text", [
    pytest.param(["--train.steps"], "--train.steps", id="missing-value"),
    pytest.param(["train.steps=3"], "train.steps=3", id="no-dashes"),
    pytest.param(["--steps=3"], "--steps=3", id="no-section"),
    pytest.param(["--train.steps=3", "extra"], "extra", id="stray-word"),
])
def test_malformed_command_line_override_is_an_error_naming_it(args, text):
    with pytest.raises(ConfigError) as err:
        parse_cli_overrides(args)
    assert text in str(err.value)


def test_last_command_line_override_wins():
    config = load_config(cli=parse_cli_overrides(["--train.steps=3", "--train.steps", "4"]))
    assert config.train.steps == 4


def test_a_renamed_key_says_what_it_is_called_now():
    with pytest.raises(ConfigError, match=r"'dist.train_timeout_s' \(from command line --dist.train_timeout_s\) is now "
                                          r"'comm.train_timeout_s'"):
        load_config(cli=[("dist.train_timeout_s", "5")])
    assert load_config(cli=[("comm.train_timeout_s", "5")]).comm.train_timeout_s == 5.0


def test_the_eval_data_can_be_spelled_eval_data_uri_in_every_source(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text('[eval]\nevery_steps = 5\n[eval.data]\nuri = "channel:validation"\n')
    assert load_config(toml_path=toml).eval.data_uri == "channel:validation"
    assert load_config(cli=parse_cli_overrides(["--eval.data.uri=/data/val"])).eval.data_uri == "/data/val"
    assert load_config(hyperparameters={"eval.data.uri": "s3://b/val"}).eval.data_uri == "s3://b/val"
    toml.write_text('[train.data]\nuri = "x"\n')  # only the known spellings nest
    with pytest.raises(ConfigError, match="train.data"):
        load_config(toml_path=toml)


# ------------------------------------------------------------------ one check for every key

RANGE_CASES = [
    # (key, value outside its range, what the message says is allowed)
    ("watchdog.multiple", "-5", ">= 1"),
    ("health.iters", "0", ">= 1"),
    ("watchdog.exchange_s", "-1", ">= 0"),
    ("launch.stop_deadline_s", "-3", ">= 0"),
    ("data.timeout_s", "0", "> 0"),
    ("data.stage_timeout_s", "-1", "> 0"),
    ("train.steps", "0", ">= 1"),
    ("train.min_lr_ratio", "1.5", "from 0 to 1"),
    ("checkpoint.keep", "0", ">= 1"),
    ("checkpoint.part_size_mb", "1", "from 5 to 5120"),
    ("parallel.dp_shard", "0", "not 0"),
    ("parallel.zero_stage", "4", "from -1 to 3"),
    ("comm.train_timeout_s", "0", "> 0"),
    ("health.straggler_factor", "1", "> 1"),
    ("train.lr", "nan", "a finite number >= 0"),
    ("train.lr", "-0.1", "a finite number >= 0"),
    ("comm.init_timeout_s", "inf", "a finite number > 0"),
]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("key, value, allowed", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_a_value_outside_its_range_is_refused_naming_key_value_source_and_range(source, key, value, allowed, tmp_path):
    load, where = _load_from(source, key, value, tmp_path)
    with pytest.raises(ConfigError) as err:
        load()
    message = str(err.value)
    assert key in message and where in message and value in message and allowed in message, message


@pytest.mark.parametrize("section, key, value, needle", [
    ("watchdog", "multiple", -5.0, "watchdog.multiple=-5.0 (from the program's Config): expects a finite number >= 1"),
    ("train", "lr_schedule", "linear", "train.lr_schedule='linear' (from the program's Config): expects one of"),
    ("launch", "nproc_per_node", "2", "launch.nproc_per_node='2' (from the program's Config): expects an integer"),
])
def test_a_config_built_in_a_program_is_checked_by_the_same_rules(section, key, value, needle):
    config = Config()
    setattr(getattr(config, section), key, value)
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert needle in str(err.value)


@pytest.mark.parametrize("cli, needle", [
    ([("checkpoint.resume", "s3://b/run/latest")], "checkpoint.resume='s3://b/run/latest': use auto, never"),
    ([("checkpoint.uri", "gs://b/x")], "checkpoint.uri='gs://b/x' (from command line --checkpoint.uri)"),
    ([("checkpoint.run_id", "a/b")], "checkpoint.run_id='a/b': use letters, digits, '.', '_' and '-' only "
                                     "(from command line --checkpoint.run_id)"),
    ([("parallel.pp", "2"), ("parallel.stages_per_rank", "2")],
     "parallel.stages_per_rank=2 (from command line --parallel.stages_per_rank) needs parallel.pp_schedule=interleaved"),
    ([("parallel.pp", "2"), ("train.micro_batch_size", "2")], "train.micro_batch_size=2 (from command line"),
])
def test_cross_key_rules_name_every_key_involved(cli, needle):
    with pytest.raises(ConfigError) as err:
        validate(load_config(cli=cli))
    assert needle in str(err.value)


def test_a_setting_without_effect_is_not_an_error():
    """stages_per_rank without pipelining has nothing to apply to (as before the one check)."""
    validate(load_config(cli=[("parallel.stages_per_rank", "2")]))


def test_the_defaults_pass_the_check():
    assert validate(Config()) == Config()
