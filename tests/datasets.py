"""Synthetic token shards whose samples carry their own id, for exact order checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llm_runtime.data.shards import INDEX_NAME, ShardIndex, write_shard


def write_dataset(directory: Path, shard_sizes, seq_len: int = 16) -> ShardIndex:
    """Shards of ``shard_sizes`` samples; sample number k (over all shards) starts with k in base 256."""
    directory.mkdir(parents=True, exist_ok=True)
    index = ShardIndex(seq_len=seq_len, tokenizer="byte", vocab_size=256, dtype="uint16")
    first = 0
    for number, size in enumerate(shard_sizes):
        samples = []
        for k in range(first, first + size):
            row = np.full(seq_len + 1, (k * 7) % 256, dtype=np.uint16)
            row[0], row[1] = k % 256, k // 256
            samples.append(row)
        index.shards.append(write_shard(directory / f"shard-{number:06d}.tar", samples, first_key=first))
        first += size
    (directory / INDEX_NAME).write_text(index.to_json())
    return index


def sample_ids(rows) -> list[int]:
    """The ids of a batch's rows (the first two tokens)."""
    rows = np.asarray(rows)
    return [int(a) + 256 * int(b) for a, b in rows[:, :2]]


def global_id(shard_sizes, shard: int, sample: int) -> int:
    return int(sum(shard_sizes[:shard])) + sample


def write_bpe_tokenizer(path: Path, vocab_size: int = 300, texts=None) -> Path:
    """A small byte-level BPE trained with the tokenizers library, saved as a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts or ["The river bends at the ferry. Lanterns on the water."] * 50, trainer)
    tokenizer.save(str(path))
    return path
