"""llm_runtime: an in-container runtime for distributed LLM training on SageMaker-style clusters.

Importing this package reads no environment, touches no disk and imports no torch.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Runtime", "init", "__version__"]


def __getattr__(name: str):
    # torch is imported only when a worker asks for the runtime.
    if name in ("init", "Runtime"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'llm_runtime' has no attribute {name!r}")
