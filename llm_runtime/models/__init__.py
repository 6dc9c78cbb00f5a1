"""Small models the runtime ships so that every layer can be tested end to end.

The Llama here is deliberately plain torch: the parallelism layers (tensor,
pipeline, fully sharded) wrap it from outside by attribute name, so the model
itself stays readable and carries no distributed code.
"""
from llm_runtime.models.llama import Llama, LlamaConfig
from llm_runtime.models.text import bundled_text
from llm_runtime.models.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "Llama", "LlamaConfig", "bundled_text"]
