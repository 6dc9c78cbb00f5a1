"""Hugging Face causal LMs (Llama, Mistral, Qwen2) in the shape ``parallelize`` expects.

:class:`HFCausalLM` holds an HF model's own modules (``embed_tokens``, decoder ``layers``,
``norm``, ``lm_head``) flat, with a forward from tokens to logits that skips the modules a
pipeline stage dropped. It calls HF's decoder layers as HF's own model does, with the rotary
tables from the family's rotary module and SDPA's causal attention (no mask tensor, as HF's SDPA
path does for unpadded training batches). Its parameter names are HF's without the ``model.``
prefix: :meth:`HFCausalLM.hf_name` maps them back for loading and export.

``transformers`` is imported only when a config is built (``llm-runtime[hf]``); the layout
checks here are pure functions of the config dict.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["FAMILIES", "HFCausalLM", "INSTALL_HINT", "check_hf_layout", "hf_tp_plan", "is_hf_causal_lm"]

log = logging.getLogger(__name__)

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""Supported ``model_type`` -> the architecture built for it."""

INSTALL_HINT = "Hugging Face models need transformers: pip install 'llm-runtime[hf]'"

_STYLES = ("colwise", "rowwise")
"""base_model_tp_plan entries used for the blocks (others, such as ``colwise_gather_output`` on
the head, stay replicated: the head and embeddings are sharded by FSDP, not TP)."""


_CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3")
"""Attention implementations that are causal when given no mask (HF's own unpadded training path)."""


def _fp32() -> dict:
    """from_config's dtype argument: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def is_hf_causal_lm(model: nn.Module) -> bool:
    """An HF ``*ForCausalLM``: a ``model`` with decoder ``layers``, an ``lm_head`` and a config."""
    inner = getattr(model, "model", None)
    return (hasattr(getattr(model, "config", None), "model_type") and isinstance(getattr(model, "lm_head", None), nn.Module)
            and isinstance(getattr(inner, "layers", None), nn.ModuleList))


def check_hf_layout(config: Mapping, *, tp: int, pp: int, seq_len: int, where: str = "config.json") -> None:
    """ValueError naming the key when the family, the layout or the sequence length does not fit
    (``config`` is the config.json dict)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{where}: model_type={family!r} is not supported; supported: "
                         + ", ".join(f"{k} ({v})" for k, v in FAMILIES.items()))
    heads = config.get("num_attention_heads", 0)
    kv_heads = config.get("num_key_value_heads") or heads
    for key, size in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                      ("intermediate_size", config.get("intermediate_size", 0))):
        if tp > 1 and size % tp:
            raise ValueError(f"parallel.tp={tp} must divide {where} {key} ({size})")
    if pp > 1 and config.get("tie_word_embeddings"):
        raise ValueError(f"{where}: tie_word_embeddings=true shares the embedding with the head, which a pipeline "
                         f"puts on different stages; parallel.pp={pp} is not supported for tied models (use FSDP/TP)")
    window = _sliding_window(config)
    if window and seq_len > window:
        raise ValueError(f"{where}: sliding_window={window} is shorter than train.seq_len={seq_len}; the runtime's "
                         "attention is full causal, so lower train.seq_len to at most the window")
    positions = config.get("max_position_embeddings")
    if positions and seq_len > positions and not (config.get("rope_scaling") or {}):
        raise ValueError(f"{where}: train.seq_len={seq_len} exceeds max_position_embeddings={positions}")


def warn_sliding_window(config: Mapping, where: str) -> None:
    """rt.parallelize does not know the sequence length: say that a window is not applied."""
    window = _sliding_window(config)
    if window:
        log.warning("%s: sliding_window=%d is not applied (attention here is full causal): keep sequences at most "
                    "%d tokens long", where, window, window)


def _sliding_window(config: Mapping) -> int:
    """The window of the layers that use one (0: every layer attends to the whole sequence)."""
    window = config.get("sliding_window") or 0
    if not window:
        return 0
    if config.get("model_type") == "qwen2":  # Qwen2 slides only with use_sliding_window
        types = config.get("layer_types") or []
        return window if config.get("use_sliding_window") or "sliding_attention" in types else 0
    return window


def hf_tp_plan(model_or_config) -> dict[str, object]:
    """Per-block TP plan from the family's ``base_model_tp_plan`` (``layers.*.<path>`` entries)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    config = getattr(model_or_config, "config", model_or_config)
    plan = getattr(config, "base_model_tp_plan", None) or {}
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    out = {}
    for pattern, style in plan.items():
        prefix, _, path = pattern.partition("layers.*.")
        if prefix or not path or style not in _STYLES:
            continue
        out[path] = styles[style]()
    if not out:
        raise ValueError(f"{type(config).__name__} has no base_model_tp_plan for its layers; parallel.tp must be 1")
    return out


class HFCausalLM(nn.Module):
    """An HF causal LM's modules, flat, with a tokens -> logits forward that skips None modules."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if not is_hf_causal_lm(hf_model):
            raise TypeError(f"{type(hf_model).__name__} is not a Hugging Face causal LM (model.layers, lm_head)")
        self.config = hf_model.config
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.tied = self.lm_head.weight is self.embed_tokens.weight
        implementation = getattr(self.config, "_attn_implementation", None)
        if implementation not in _CAUSAL_WITHOUT_MASK:  # eager attention needs a mask tensor: use SDPA
            log.info("%s: attention %s -> sdpa (causal without a mask tensor)", type(hf_model).__name__,
                     implementation)
            self.config._attn_implementation = "sdpa"
        with torch.device("cpu"):  # real tables even for a meta model: computed, not learned
            self.rotary_emb = type(inner.rotary_emb)(config=self.config)

    @staticmethod
    def hf_name(name: str) -> str:
        """This module's parameter name as the HF checkpoint spells it."""
        return name if name.startswith("lm_head.") else f"model.{name}"

    def parallel_options(self) -> dict:
        """parallelize's keyword arguments for this model (TP plan, pipeline modules). TP splits the
        blocks only (no sequence parallelism: parallel.sequence_parallel does not apply)."""
        options = dict(layers_attr="layers", first_only=("embed_tokens",), last_only=("norm", "lm_head"),
                       root_tp_plan={})
        try:
            options["tp_plan"] = hf_tp_plan(self.config)
        except ValueError:
            pass  # parallelize says parallel.tp > 1 needs a plan
        return options

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = self.rotary_emb(hidden, positions)
        for layer in (self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers):
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.lm_head(hidden) if self.lm_head is not None else hidden

    def init_fn(self, generator: torch.Generator | None = None):
        """``init_fn(name, tensor)``: the family's scheme, each tensor from a seed of its own name
        (layout-independent): N(0, initializer_range) for linear and embedding weights (the padding
        row zero), zeros for biases, ones for norm weights."""
        from .llama import DEFAULT_INIT_SEED, _named_generator

        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(DEFAULT_INIT_SEED)
        base_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu").item())
        std = getattr(self.config, "initializer_range", 0.02)

        @torch.no_grad()
        def fill(name: str, tensor: torch.Tensor) -> None:
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            if leaf == "bias":
                tensor.zero_()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                full = torch.empty(tensor.shape, dtype=torch.float32).normal_(
                    0.0, std, generator=_named_generator(base_seed, self.hf_name(name)))
                padding = getattr(module, "padding_idx", None)
                if padding is not None:
                    full[padding].zero_()
                tensor.copy_(full)
            elif leaf == "weight" and tensor.dim() == 1:  # RMSNorm
                tensor.fill_(1.0)
            else:
                raise ValueError(f"{type(self.config).__name__}: no initialisation for {name!r}")

        return fill

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def rope_summary(config) -> str:
    """One log word for the rotary scheme (``default``, ``llama3``, ``yarn`` ...)."""
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return f"{kind} (theta {getattr(config, 'rope_theta', None) or scaling.get('rope_theta')})"



class HFModelSpec:
    """``model.hf_path``'s model: its directory (hf_source.HFSource), built on demand."""

    def __init__(self, source):
        self.source = source
        self.vocab_size = int(source.config.get("vocab_size", 0))

    def hf_config(self):
        try:
            from transformers import AutoConfig
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        return AutoConfig.from_pretrained(str(self.source.directory), local_files_only=True)

    def build(self, meta: bool = True) -> HFCausalLM:
        """The model in fp32 (the weights' own dtype returns at export), on the meta device or, for
        DeepSpeed (which takes no meta parameters; under zero.Init, partitioned), allocated."""
        from transformers import AutoModelForCausalLM

        config = self.hf_config()
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **_fp32())
        return HFCausalLM(model)

    @functools.cached_property
    def _layout(self) -> HFCausalLM:
        """One meta model for the shape, count and FLOP questions."""
        return self.build()

    def shapes(self) -> tuple[dict[str, tuple[int, ...]], frozenset]:
        """(HF name -> shape of every parameter, the names a tied model may omit)."""
        model = self._layout
        shapes = {HFCausalLM.hf_name(n): tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        return shapes, frozenset({"lm_head.weight"}) if model.tied else frozenset()

    def num_parameters(self) -> int:
        return self._layout.num_parameters()

    def flops_per_token(self, seq_len: int) -> int:
        """``6*N + 12*layers*hidden*seq_len`` (N without the embedding lookup), as the bundled model."""
        config = self.source.config
        model = self._layout
        non_embedding = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed_tokens."))
        if model.tied:
            non_embedding += model.lm_head.weight.numel()
        return 6 * non_embedding + 12 * config["num_hidden_layers"] * config["hidden_size"] * seq_len

    def export_spec(self):
        """How train.model_dir gets this model: HF's names, the input's dtype, its tokenizer files."""
        from ..checkpoint.export import ExportSpec
        from .hf_source import TOKENIZER_FILES
        from .llama_hf import DTYPE_NAMES

        dtype, directory = self.source.dtype, self.source.directory
        dtypes = {n: d for n, d in self.source.dtypes.items() if d != dtype}  # each tensor keeps its own
        name = DTYPE_NAMES[dtype]
        return ExportSpec(name_of=HFCausalLM.hf_name, dtype=dtype, dtypes=dtypes,
                          convert=lambda n, tensor: tensor.to(dtypes.get(HFCausalLM.hf_name(n), dtype)),
                          config_json=lambda _: {**self.source.config, "dtype": name, "torch_dtype": name},
                          extra_files=[directory / n for n in ("generation_config.json", *TOKENIZER_FILES)
                                       if (directory / n).is_file()])
