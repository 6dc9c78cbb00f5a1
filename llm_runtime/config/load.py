"""The one loader: every source of configuration, in precedence order, with what set each key.

Precedence, lowest to highest: defaults < TOML file (``--config``) < ``LLM_RUNTIME_<SECTION>_<KEY>``
variables < SageMaker hyperparameters (``section.key``) < command line ``--section.key=value``.
No other module reads configuration from the environment. Each value is coerced to its key's
type and checked against its choices and range as it is read, so the error names its source.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .rules import allowed, base_type, problem
from .tree import Config

__all__ = ["ENV_PREFIX", "ConfigError", "load_config", "parse_cli_overrides", "recorded_sources", "source_of", "to_dict"]

ENV_PREFIX = "LLM_RUNTIME_"

#: Keys that were renamed, with their new names (a clear error instead of "unknown key").
MOVED = {"dist.init_timeout_s": "comm.init_timeout_s", "dist.train_timeout_s": "comm.train_timeout_s",
         "train.metrics_path": "metrics.jsonl"}
#: Other spellings of a key, accepted as it (``[eval.data] uri`` in TOML is ``eval.data.uri``).
ALIASES = {"eval.data.uri": "eval.data_uri"}
_NESTED = {alias.rsplit(".", 1)[0] for alias in ALIASES}  # the TOML tables an alias implies


class ConfigError(ValueError):
    """A configuration value is unknown or malformed; the message names the key and its source."""


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def hints(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section), include_extras=True)


def recorded_sources(config: Config) -> dict[str, str]:
    """``{section.key: source}`` for every key a source (file, variable, hyperparameter, flag) set."""
    return config.__dict__.get("_sources", {})


def source_of(config: Config, dotted: str) -> str:
    """Where ``section.key`` got its value: a file, a variable, hyperparameters, a flag, or the program."""
    recorded = recorded_sources(config).get(dotted)
    if recorded:
        return recorded
    section_name, _, key = dotted.partition(".")
    default = getattr(type(getattr(config, section_name))(), key)
    return "the default" if getattr(getattr(config, section_name), key) == default else "the program's Config"


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    kind = base_type(hint)

    def bad() -> ConfigError:
        return ConfigError(f"{key}={value!r} (from {source}): expects {allowed(hint)}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise bad()
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise bad()
    try:
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if kind is float:
            return float(value)
    except (TypeError, ValueError):
        raise bad() from None
    return str(value)


def _set(config: Config, dotted: str, value: Any, source: str) -> None:
    dotted = ALIASES.get(dotted, dotted)
    by_name = sections(config)
    section_name, _, key = dotted.partition(".")
    if section_name not in by_name or not key:
        raise ConfigError(
            f"unknown config key {dotted!r} (from {source}); keys look like section.key "
            f"with section one of {', '.join(by_name)}"
        )
    section = by_name[section_name]
    if dotted in MOVED:
        raise ConfigError(f"config key {dotted!r} (from {source}) is now {MOVED[dotted]!r}")
    section_hints = hints(section)
    if key not in section_hints:
        raise ConfigError(
            f"unknown config key {dotted!r} (from {source}); [{section_name}] has "
            f"{', '.join(sorted(section_hints))}"
        )
    hint = section_hints[key]
    value = _coerce(value, hint, dotted, source)
    if problem(value, hint):
        raise ConfigError(f"{dotted}={value!r} (from {source}): expects {allowed(hint)}")
    setattr(section, key, value)
    config.__dict__.setdefault("_sources", {})[dotted] = source  # read through recorded_sources


def parse_cli_overrides(args: Iterable[str]) -> list[tuple[str, str]]:
    """``--section.key=value`` or ``--section.key value`` pairs, in order."""
    args = list(args)
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --train.steps=10")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value (--{name}=VALUE)")
            i += 1
            value = args[i]
        pairs.append((name, value))
        i += 1
    return pairs


def _walk_toml(data: Mapping[str, Any], path: Path) -> list[tuple[str, Any]]:
    pairs = []
    for section, body in data.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
        for key, value in body.items():
            if isinstance(value, Mapping) and f"{section}.{key}" in _NESTED:  # [eval.data]
                pairs.extend((f"{section}.{key}.{sub}", inner) for sub, inner in value.items())
            else:
                pairs.append((f"{section}.{key}", value))
    return pairs


def _read_toml(toml_path: str | Path) -> list[tuple[str, Any]]:
    path = Path(toml_path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return _walk_toml(data, path)


def load_config(
    *,
    toml_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    cli: Iterable[tuple[str, str]] = (),
    strict_hyperparameters: bool = True,
) -> Config:
    """Build the Config from every source, in precedence order (see module docstring).

    ``strict_hyperparameters=False`` is for user programs on SageMaker: their own
    hyperparameters (keys without a known ``section.``) are theirs, not ours.
    """
    config = Config()
    known = sections(config)
    for key, value in _read_toml(toml_path) if toml_path else ():
        _set(config, key, value, f"config file {toml_path}")
    for name, value in sorted((env or {}).items()):
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):].count("_") >= 1:
            section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
            if section in known:
                _set(config, f"{section}.{key}", value, f"environment variable {name}")
    for key, value in (hyperparameters or {}).items():
        if key.startswith("sagemaker_"):
            continue  # the platform's own parameters (program, region, distribution, ...)
        if not strict_hyperparameters and key.partition(".")[0] not in known:
            continue
        _set(config, key, value, "SageMaker hyperparameters.json")
    for key, value in cli:
        _set(config, key, value, f"command line --{key}")
    return config
