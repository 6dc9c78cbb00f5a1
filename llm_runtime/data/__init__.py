"""Token shards: preparation (text -> shards + index.json) and reading."""
from .prepare import PrepareError, PrepareSummary, prepare
from .shards import ShardIndex, ShardInfo, read_index, read_shard

__all__ = ["PrepareError", "PrepareSummary", "ShardIndex", "ShardInfo", "prepare", "read_index", "read_shard"]
