"""``model.hf_path``: a Hugging Face model directory as the job's model, weights and tokenizer.

The directory holds ``config.json``, optionally weights (``model.safetensors``, or sharded
``*.safetensors`` named by ``model.safetensors.index.json``) and optionally ``tokenizer.json``.
It may be a local or shared path, ``channel:NAME`` (a SageMaker input channel) or
``s3://bucket/prefix``, which the launcher copies to node-local disk once per node before any
worker starts (:func:`stage`); the workers read that copy.

Reading weights never loads a file whole: :meth:`HFWeights.init_fn` fills one parameter at a time
from a memory-mapped safetensors file, and for a DTensor shard only the rows and columns the
rank holds (``get_slice``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["HFSource", "HFSourceError", "HFWeights", "local_dir", "read_source", "stage"]

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
"""Copied beside the exported weights when the input has them (with generation_config.json)."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
IGNORED = (".rotary_emb.inv_freq",)
"""Tensors some older conversions still hold and HF's own loader ignores (computed, not learned)."""


class HFSourceError(ValueError):
    """A model directory that cannot be used; the message names the file or key."""


@dataclass
class HFSource:
    """What a model directory holds (read by :func:`read_source`)."""

    directory: Path
    config: dict
    files: dict[str, str] = field(default_factory=dict)
    """Tensor name -> weights file (empty: no weights, random init)."""
    tokenizer: Path | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 of config.json's content (canonical JSON): a checkpoint of another model is refused."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the one most tensors have), else config.json's ``dtype`` / ``torch_dtype``."""
        if self.files:
            return Counter(self.dtypes.values()).most_common(1)[0][0]
        return _DTYPES.get(self.config.get("dtype") or self.config.get("torch_dtype") or "", torch.float32)

    @functools.cached_property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Each weight's own dtype (a checkpoint may keep some, its norms say, in float32); the
        headers are read once."""
        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        out = {}
        for file, names in by_file.items():
            with _open(self.directory / file) as handle:
                out.update((name, _slice_dtype(handle, name)) for name in names)
        return out


def _slice_dtype(handle, name: str) -> torch.dtype:
    text = handle.get_slice(name).get_dtype()
    if text not in _SAFETENSORS_DTYPES:
        raise HFSourceError(f"{name}: dtype {text} is not supported (float32, bfloat16, float16)")
    return _SAFETENSORS_DTYPES[text]


def local_dir(value: str, paths) -> Path:
    """Where the directory is on this host: the path, the channel's directory, or the staged copy
    (``<root>/llm-runtime/hf-model/<hash of the URI>``: /opt/ml's volume on SageMaker, the temp
    directory where that root is not writable)."""
    if value.startswith("channel:"):
        return Path(paths.channel_dir(value[len("channel:"):]))
    if value.startswith("s3://"):
        digest = hashlib.sha256(value.rstrip("/").encode()).hexdigest()[:16]
        root = paths.root if paths is not None and os.access(paths.root, os.W_OK) else tempfile.gettempdir()
        return Path(root) / "llm-runtime" / "hf-model" / digest
    return Path(value)


STAGED = ".staged.json"
"""In a staged copy: each file's size and ETag as listed when it was fetched."""


def stale(listed: Mapping[str, tuple[int, str]], recorded: Mapping, present: Mapping[str, int]) -> list[str]:
    """The objects to fetch (config.json last): those not on disk, of another size, or whose ETag
    differs from the one recorded at their fetch (a model re-uploaded with the same sizes)."""
    out = [name for name, (size, etag) in listed.items()
           if present.get(name) != size or list(recorded.get(name) or ()) != [size, etag]]
    return sorted(out, key=lambda name: (name == "config.json", name))


def stage(value: str, target: Path, timeout_s: float = 3600.0) -> None:
    """Copy ``s3://bucket/prefix`` to ``target`` with s5cmd (or the store's downloads), within
    ``timeout_s``. Files already there with the object's size and ETag are kept: a restarted job
    does not fetch a 100 GB model again. config.json lands last, the record of ETags after it."""
    from ..storage import StorageError, open_store
    from ..storage.bulk import download_many

    try:
        listed = {name: (size, etag) for name, size, etag in open_store(value).versions("") if "/" not in name}
    except StorageError as err:
        raise HFSourceError(f"model.hf_path={value}: {err}") from None
    if "config.json" not in listed:
        raise HFSourceError(f"model.hf_path={value}: no config.json under that prefix")
    try:
        target.mkdir(parents=True, exist_ok=True)
        _remove_parts(target)
        for path in target.iterdir():  # the copy mirrors the prefix: an older upload's extra files go
            if path.is_file() and path.name not in listed and path.name != STAGED:
                path.unlink()
        present = {path.name: path.stat().st_size for path in target.iterdir() if path.is_file()}
        fetch = stale(listed, _recorded(target), present)
        (target / STAGED).unlink(missing_ok=True)
        tool = download_many(value, [(name, target / f".{name}.part") for name in fetch], timeout_s,
                             workdir=target) if fetch else "none"
        for name in fetch:
            os.replace(target / f".{name}.part", target / name)
        (target / STAGED).write_text(json.dumps({name: list(v) for name, v in listed.items()}, sort_keys=True))
    except StorageError as err:
        _remove_parts(target)
        raise HFSourceError(f"model.hf_path={value}: {err}") from None
    except OSError as err:
        _remove_parts(target)
        raise HFSourceError(f"model.hf_path={value}: staging to {target} failed: {err}") from None
    log.info("model.hf_path: %s staged to %s (%d file(s), %.1f MB fetched with %s; %d kept)", value, target,
             len(fetch), sum(listed[n][0] for n in fetch) / 1e6, tool, len(listed) - len(fetch))


def _recorded(target: Path) -> dict:
    try:
        return json.loads((target / STAGED).read_text())
    except (OSError, ValueError):
        return {}


def _remove_parts(target: Path) -> None:
    for part in target.glob(".*.part") if target.is_dir() else ():
        part.unlink(missing_ok=True)


def read_source(directory: Path, where: str) -> HFSource:
    """config.json, the weights' file map and the tokenizer of a model directory."""
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise HFSourceError(f"{where}: no config.json in {directory}") from None
    except (OSError, ValueError) as err:
        raise HFSourceError(f"{where}: {config_path} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise HFSourceError(f"{where}: {config_path} is not a JSON object")
    tokenizer = directory / "tokenizer.json"
    return HFSource(directory=directory, config=config, files=_weight_files(directory, where),
                    tokenizer=tokenizer if tokenizer.is_file() else None)


def _weight_files(directory: Path, where: str) -> dict[str, str]:
    index = directory / INDEX
    if index.is_file():
        try:
            files = dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HFSourceError(f"{where}: {index} has no readable weight_map ({err})") from None
        for name in sorted(set(files.values())):
            if not (directory / name).is_file():
                raise HFSourceError(f"{where}: {index} names {name}, which is not in {directory}")
        return files
    single = directory / SINGLE
    if single.is_file():
        with _open(single) as handle:
            return dict.fromkeys(handle.keys(), SINGLE)
    return {}


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # noqa: BLE001 - safetensors' own header errors
        raise HFSourceError(f"{path}: not a safetensors file ({err})") from None


def check_shapes(source: HFSource, expected: Mapping[str, tuple[int, ...]], where: str,
                 optional: frozenset = frozenset()) -> None:
    """Every expected tensor is in the weights with its shape (``optional`` ones may be absent:
    a tied head); nothing unexpected is there. One line naming the tensor and both shapes."""
    missing = sorted(set(expected) - set(source.files) - optional)
    if missing:
        raise HFSourceError(f"{where}: the weights lack {len(missing)} tensor(s) the config needs, "
                            f"e.g. {missing[0]!r}")
    unexpected = sorted(name for name in set(source.files) - set(expected) if not name.endswith(IGNORED))
    if unexpected:
        raise HFSourceError(f"{where}: the weights hold {len(unexpected)} tensor(s) the config has no place for, "
                            f"e.g. {unexpected[0]!r} in {source.files[unexpected[0]]}")
    by_file: dict[str, list[str]] = {}
    for name in expected:
        if name in source.files:
            by_file.setdefault(source.files[name], []).append(name)
    for file, names in by_file.items():
        with _open(source.directory / file) as handle:
            for name in names:
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise HFSourceError(f"{where}: {name} in {file} has shape {list(shape)}, the config needs "
                                        f"{list(expected[name])}")


class HFWeights:
    """Fills parameters from a model directory's safetensors, by HF name (``name_of`` maps the
    module's names). Files stay memory-mapped and open for the fill, closed by :meth:`close`."""

    def __init__(self, source: HFSource, name_of):
        self.source, self.name_of = source, name_of
        self._handles: dict[str, object] = {}
        self.reads = {"block": 0, "whole": 0}
        """Tensors read as this rank's block only, and read whole (then sliced or copied)."""

    def _slice(self, name: str):
        hf = self.name_of(name)
        file = self.source.files.get(hf)
        if file is None:
            raise HFSourceError(f"{self.source.directory}: no tensor {hf!r} in the weights")
        if file not in self._handles:
            self._handles[file] = _open(self.source.directory / file).__enter__()
        return self._handles[file].get_slice(hf)

    @torch.no_grad()
    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        """``init_fn`` (full tensor)."""
        tensor.copy_(self._slice(name)[:])
        self.reads["whole"] += 1

    @torch.no_grad()
    def fill_local(self, name: str, local: torch.Tensor, offsets: tuple[int, ...]) -> None:
        """This rank's block of ``name``: ``local.shape`` elements from ``offsets`` (no full copy)."""
        index = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
        local.copy_(self._slice(name)[index])
        self.reads["block"] += 1

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
