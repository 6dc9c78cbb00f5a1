"""prepare-data: text and JSON lines into deterministic token shards with a verified index."""
import gzip
import hashlib
import json

import numpy as np
import pytest

from llm_runtime.cli import main
from llm_runtime.data import PrepareError, prepare, read_index, read_shard
from llm_runtime.data.prepare import expand_inputs, files_for_host, parse_size
from tests.datasets import write_bpe_tokenizer


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    (root / "a.txt").write_text("The river bends at the ferry. " * 200)
    (root / "nested" / "b.txt").write_text("Lanterns on the water, ünïcode too. " * 150)
    with gzip.open(root / "c.jsonl.gz", "wt") as sink:
        for number in range(120):
            sink.write(json.dumps({"text": f"record {number} " * 12, "id": number}) + "\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def shard_bytes(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.glob("shard-*.tar"))}


def test_same_inputs_give_byte_identical_shards_whatever_the_worker_count(corpus, tmp_path):
    one = prepare([str(corpus)], str(tmp_path / "one"), seq_len=32, shard_size=8192, workers=1, progress=False)
    three = prepare([str(corpus)], str(tmp_path / "three"), seq_len=32, shard_size=8192, workers=3, progress=False)
    assert one.shards > 2 and (one.samples, one.tokens) == (three.samples, three.tokens)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "three")
    assert (tmp_path / "one" / "index.json").read_text() == (tmp_path / "three" / "index.json").read_text()


def test_index_lists_every_shard_with_its_count_size_and_checksum(corpus, tmp_path):
    summary = prepare([str(corpus)], str(tmp_path / "out"), seq_len=16, shard_size=4096, progress=False)
    index = read_index((tmp_path / "out" / "index.json").read_text(), "index.json")
    assert (index.seq_len, index.tokenizer, index.dtype, index.vocab_size) == (16, "byte", "uint16", 256)
    assert len(index.shards) == summary.shards and index.total_samples == summary.samples
    for info in index.shards:
        data = (tmp_path / "out" / info.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (info.bytes, info.sha256)
        samples = list(read_shard(tmp_path / "out" / info.name))
        assert len(samples) == info.samples
        assert all(s.shape == (17,) and s.dtype == np.uint16 for s in samples)
    assert max(info.bytes for info in index.shards) <= 4096 + 10240  # the size target, plus tar's end padding


def test_samples_are_the_files_tokens_in_order(tmp_path):
    (tmp_path / "one.txt").write_text("abcdefghij" * 3)  # 30 bytes -> 3 samples of 9 + 1, remainder dropped
    prepare([str(tmp_path / "one.txt")], str(tmp_path / "out"), seq_len=8, progress=False)
    samples = list(read_shard(tmp_path / "out" / "shard-000000.tar"))
    text = b"abcdefghij" * 3
    assert [bytes(s.astype(np.uint8)) for s in samples] == [text[0:9], text[9:18], text[18:27]]


def test_corrupt_shard_names_the_shard_and_the_offset(corpus, tmp_path):
    prepare([str(corpus)], str(tmp_path / "out"), seq_len=32, shard_size=8192, progress=False)
    shard = tmp_path / "out" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[1200:1300] = b"\xff" * 100  # inside the second member's header
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-000000.tar is corrupt or truncated at byte offset \d+"):
        list(read_shard(shard))


@pytest.mark.parametrize("files, host, hosts, expected", [
    (["a", "b", "c", "d", "e"], 0, 2, ["a", "c", "e"]),
    (["a", "b", "c", "d", "e"], 1, 2, ["b", "d"]),
    (["a"], 2, 3, []),
    (["a", "b"], 0, 1, ["a", "b"]),
])
def test_each_host_takes_every_nth_file(files, host, hosts, expected):
    assert files_for_host(files, host, hosts) == expected


@pytest.mark.parametrize("text, expected", [("256MB", 256 * 10**6), ("64MiB", 64 * 2**20), ("1000", 1000),
                                            ("1.5kb", 1500)])
def test_shard_sizes_parse_with_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12XB", "0", "-5MB"])
def test_bad_shard_size_is_refused_naming_it(bad):
    with pytest.raises(PrepareError, match="--shard-size"):
        parse_size(bad)


def test_inputs_expand_directories_and_globs_and_skip_other_files(corpus):
    found = expand_inputs([str(corpus), str(corpus / "*.txt")])
    assert [f.rsplit("/", 1)[-1] for f in found] == ["a.txt", "c.jsonl.gz", "b.txt"]


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "no such file"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n'), "x.jsonl:2: no string field 'text'"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "ok"}\nnot json\n'), "x.jsonl:2: not valid JSON"),
], ids=["missing-file", "jsonl-without-text", "jsonl-not-json"])
def test_bad_input_is_one_line_naming_file_and_line(make, needle, tmp_path, capsys):
    make(tmp_path)
    code = main(["prepare-data", "--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "out"),
                 "--seq-len", "8", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_cli_prints_the_summary_line(corpus, tmp_path, capsys):
    assert main(["prepare-data", "--input", str(corpus), "--output", str(tmp_path / "out"), "--seq-len", "32",
                 "--shard-size", "16KB"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("prepared files=3 tokens=") and "shards=" in line and "seconds=" in line


@pytest.fixture
def bpe_tokenizer(tmp_path):
    return write_bpe_tokenizer(tmp_path / "tokenizer.json")


def test_a_tokenizer_json_names_itself_in_the_index_and_ends_documents(corpus, tmp_path, bpe_tokenizer):
    from tokenizers import Tokenizer

    prepare([str(corpus)], str(tmp_path / "out"), seq_len=32, shard_size=8192, tokenizer=str(bpe_tokenizer),
            progress=False)
    index = read_index((tmp_path / "out" / "index.json").read_text(), "index.json")
    digest = hashlib.sha256(bpe_tokenizer.read_bytes()).hexdigest()[:16]
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer))
    assert index.tokenizer == f"tokenizer.json@sha256:{digest}"
    assert index.vocab_size == tokenizer.get_vocab_size() and index.dtype == "uint16"
    samples = np.concatenate([np.stack(list(read_shard(tmp_path / "out" / s.name))) for s in index.shards])
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert samples.max() < index.vocab_size and (samples == eos).sum() >= 2  # a.txt and b.txt end in it
    assert "The river bends at the ferry." in tokenizer.decode(samples.ravel().tolist())


def test_a_tokenizer_that_is_not_a_tokenizer_json_is_named(corpus, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(PrepareError, match="tokenizer.json: not a tokenizer.json"):
        prepare([str(corpus)], str(tmp_path / "out"), seq_len=32, tokenizer=str(bad), progress=False)
    with pytest.raises(PrepareError, match="no/such.json: No such file"):
        prepare([str(corpus)], str(tmp_path / "out"), seq_len=32, tokenizer="no/such.json", progress=False)


@pytest.mark.parametrize("key", ["../../../etc/x00000", "/abs/path/x00000"])
def test_a_shard_member_named_outside_its_directory_is_refused_by_both_readers(tmp_path, key):
    """A hostile shard: valid tar headers (checksums right), member names absolute or with '..'."""
    from webdataset import TarWriter

    from llm_runtime.data.shards import RecordLayout, ShardIndex, _npy_bytes

    sample = np.arange(9, dtype=np.uint16)
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    for path, name in ((good, "000000000000"), (bad, key)):
        with open(path, "wb") as sink, TarWriter(sink, mtime=0.0, user="llm_runtime", group="llm_runtime") as tar:
            tar.write({"__key__": name, "tokens.npy": _npy_bytes(sample)})
    layout = RecordLayout.for_index(ShardIndex(seq_len=8, tokenizer="byte", vocab_size=256, dtype="uint16"))
    assert layout.decode(good.read_bytes()[:layout.record_bytes], "good.tar", 0).tolist() == [sample.tolist()]
    with pytest.raises(ValueError, match=r"bad.tar is corrupt at byte offset 0 .*absolute or contains '\.\.'"):
        layout.decode(bad.read_bytes()[:layout.record_bytes], "bad.tar", 0)
    with pytest.raises(ValueError, match="absolute or leaves its directory"):
        list(read_shard(bad))
