"""``validate(config)``: the one entry point that checks a configuration before anything runs.

Every key is checked against its annotation (type, ``Literal`` choices, range), whatever set it:
a file, a variable, a hyperparameter, a flag or a program that built its own ``Config``. Then
each section's cross-key rules run. Rules that need the world (the parallel layout, the batch
split, the data) are checked by the job on top of this (``train.check_job``), before any worker
starts. Errors are one line: the key, the value, where it came from and what is allowed.
"""
from __future__ import annotations

from .load import ConfigError, hints, recorded_sources, sections, source_of
from .rules import allowed, problem
from .tree import Config

__all__ = ["LAYOUT_KEYS", "set_by", "validate"]

#: The keys a layout or batch-split error on a given world size comes from.
LAYOUT_KEYS = ("parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "parallel.pp", "parallel.shard_group_size",
               "parallel.microbatches", "parallel.stages_per_rank", "parallel.pp_schedule", "train.batch_size",
               "train.micro_batch_size")


def _named(config: Config, dotted: str) -> str:
    section, _, key = dotted.partition(".")
    return f"{dotted}={getattr(getattr(config, section), key)!r} (from {source_of(config, dotted)})"


def set_by(config: Config, keys) -> str:
    """``"; set by KEY=VALUE (SOURCE), ..."`` for those of ``keys`` that some source set ("" for none):
    what a rule over several keys and the world size appends to its message."""
    recorded = recorded_sources(config)
    named = [_named(config, key) for key in keys if key in recorded]
    return f"; set by {', '.join(named)}" if named else ""


def _checkpoint_rules(config: Config) -> None:
    from ..checkpoint.layout import parse_resume, run_id_for
    from ..storage import parse_s3_uri

    ck = config.checkpoint
    try:
        if ck.uri.startswith("s3://"):
            parse_s3_uri(ck.uri)
        elif "://" in ck.uri:
            raise ValueError("use s3://bucket/prefix or a directory path")
    except ValueError as err:
        raise ConfigError(f"{_named(config, 'checkpoint.uri')}: {err}") from None
    try:
        run_id_for(ck.uri, ck.run_id)
    except ValueError as err:
        raise ConfigError(f"{err} (from {source_of(config, 'checkpoint.run_id')})") from None
    try:
        parse_resume(ck.resume)
    except ValueError as err:
        raise ConfigError(f"{err} (from {source_of(config, 'checkpoint.resume')})") from None


def _parallel_rules(config: Config) -> None:
    from ..parallel.pipeline import parse_split_points

    parallel = config.parallel
    if parallel.pp > 1 and parallel.stages_per_rank > 1 and parallel.pp_schedule != "interleaved":
        raise ConfigError(f"{_named(config, 'parallel.stages_per_rank')} needs parallel.pp_schedule=interleaved, "
                          f"not {_named(config, 'parallel.pp_schedule')}")
    try:
        parse_split_points(parallel.pp_split_points)
    except ValueError as err:
        raise ConfigError(f"{err} (from {source_of(config, 'parallel.pp_split_points')})") from None
    if parallel.pp > 1 and config.train.micro_batch_size:
        raise ConfigError(f"{_named(config, 'train.micro_batch_size')} applies without pipelining; with "
                          "parallel.pp > 1 set parallel.microbatches (the pipeline's micro-batches) instead")


#: Cross-key rules, one function per section (or pair of sections).
RULES = (_checkpoint_rules, _parallel_rules)


def validate(config: Config) -> Config:
    """Raise ConfigError for the first value outside what its key allows; returns ``config``."""
    for name, section in sections(config).items():
        for key, hint in hints(section).items():
            if problem(getattr(section, key), hint):
                raise ConfigError(f"{_named(config, f'{name}.{key}')}: expects {allowed(hint)}")
    for rule in RULES:
        rule(config)
    return config
