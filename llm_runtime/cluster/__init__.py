"""Who and where this process is: SageMaker hosts, torchrun or MPI ranks, or one local machine."""
from .base import KINDS, ClusterError, ClusterInfo, InstanceGroup
from .detect import detect, detect_here, probe_gpus

__all__ = ["KINDS", "ClusterError", "ClusterInfo", "InstanceGroup", "detect", "detect_here", "probe_gpus"]
