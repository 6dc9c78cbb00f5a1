"""The small English corpus shipped with the package for the training demo.

It is read through :mod:`importlib.resources` rather than a path next to this
file, so it also works when the package is installed from a wheel or zip.
"""
from __future__ import annotations

from importlib import resources

__all__ = ["bundled_text"]

_PACKAGE = "llm_runtime.models"
_RESOURCE = ("data", "bundled.txt")


def bundled_text() -> str:
    """The bundled corpus (original prose, CC0) as one string."""
    resource = resources.files(_PACKAGE)
    for part in _RESOURCE:
        resource = resource.joinpath(part)
    return resource.read_text(encoding="utf-8")
