"""``model.hf_path`` for the built-in trainer: everything checked before a worker starts.

A supported family that the layout can split, weights whose names and shapes are the config's,
and the data's tokenizer; each failure is one ConfigError naming the file, key or tensor. Each
node's launcher also copies an s3:// directory to node-local disk here (``stage_model``).
"""
from __future__ import annotations

import importlib.util

from .config import Config, ConfigError
from .data.build import DataPlan
from .models import ByteTokenizer
from .parallel.batching import stages_per_rank
from .parallel.dims import ParallelDims
from .parallel.pipeline import parse_split_points, split_layers
from .paths import JobPaths

__all__ = ["check_hf_model"]


def check_hf_model(config: Config, dims: ParallelDims, plan: DataPlan | None, paths: JobPaths | None, *,
                   stage_model: bool = False):
    """model.hf_path: a supported family the layout can split, weights whose names and shapes are
    the config's, and the data's tokenizer (a ConfigError naming the file, key or tensor)."""
    from .models.hf import INSTALL_HINT, HFModelSpec, check_hf_layout
    from .models.hf_source import check_shapes, local_dir, read_source, stage

    value = config.model.hf_path
    where = f"model.hf_path={value}"
    if config.parallel.backend == "deepspeed" and dims.pp > 1:
        raise ConfigError(f"{where}: DeepSpeed's pipeline engine runs only the bundled model; for a Hugging Face "
                          "model use parallel.pp=1 with DeepSpeed, or parallel.backend=fsdp with parallel.pp")
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"{where}: {INSTALL_HINT}")
    try:
        if stage_model and value.startswith("s3://"):
            stage(value, local_dir(value, paths), config.data.stage_timeout_s)
        source = read_source(local_dir(value, paths), where)
        check_hf_layout(source.config, tp=dims.tp, pp=dims.pp, seq_len=config.train.seq_len,
                        where=f"{where} config.json")
        if dims.pp > 1:
            split_layers(int(source.config.get("num_hidden_layers", 0)), dims.pp * stages_per_rank(config.parallel),
                         parse_split_points(config.parallel.pp_split_points))
        spec = HFModelSpec(source)
        if source.files:
            shapes, optional = spec.shapes()
            check_shapes(source, shapes, where, optional)
        _check_tokenizer(spec, plan, where)
    except ValueError as err:  # HFSourceError and the layout's own
        raise ConfigError(str(err)) from None
    return spec


def _check_tokenizer(spec, plan: DataPlan | None, where: str) -> None:
    """The model directory's tokenizer.json is the one the data was prepared with, and the config's
    vocabulary covers the data's token ids."""
    from .data.tokenize import load_tokenizer

    data_tokenizer = plan.index.tokenizer if plan is not None and plan.index is not None else "byte"
    if spec.source.tokenizer is not None:
        ours = load_tokenizer(str(spec.source.tokenizer)).name
        if _content(ours) != _content(data_tokenizer):
            raise ConfigError(f"{where}: its tokenizer.json ({ours}) is not the tokenizer the data was prepared "
                              f"with ({data_tokenizer}, the data's index.json); prepare the data with "
                              f"--tokenizer {spec.source.tokenizer}")
    if spec.vocab_size < data_vocab(plan):
        raise ConfigError(f"{where}: config.json vocab_size={spec.vocab_size} does not cover the data's "
                          f"{data_vocab(plan)} token ids (tokenizer {data_tokenizer})")


def _content(tokenizer_name: str) -> str:
    """A tokenizer's identity: its file's hash (``NAME@sha256:HASH``), not the file's name."""
    return tokenizer_name.partition("@")[2] or tokenizer_name


def data_vocab(plan: DataPlan | None) -> int:
    """The data's vocabulary: its index's, or the byte tokenizer's for the bundled text."""
    return plan.index.vocab_size if plan is not None and plan.index is not None else ByteTokenizer.vocab_size
