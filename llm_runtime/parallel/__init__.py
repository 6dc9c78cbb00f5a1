"""Parallel layouts: ParallelDims, the mesh, and parallelize (FSDP2/HSDP x TP x PP)."""
from .dims import AXES, ParallelDims, resolve_dims
from .pipeline import SCHEDULES, split_layers

__all__ = ["AXES", "SCHEDULES", "ParallelDims", "resolve_dims", "split_layers"]
