"""WebDataset tar shards written by WebDataset itself, read lazily through `read_documents`: the same samples
as WebDataset's own reader, patterns, folders, bad shards named, worker processes, and memory that stays
flat while every document is read (the benchmark's measurement on a small set)."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from polymodal.data.documents import DocumentError
from polymodal.data.lazy import CHECK_ALL_UP_TO, checked, document_texts
from polymodal.data.readers import data_kind, read_documents
from polymodal.data.shards import TarShards, expand

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_shards_memory.py"


def png(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((3, 4, 3), n, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    """Three shards of 4, 4 and 2 samples; sample 5 has a .json caption instead of a .txt."""
    with wds.ShardWriter(str(tmp_path / "s-%02d.tar"), maxcount=4, verbose=0) as sink:
        for n in range(10):
            text = {"json": json.dumps({"caption": f"caption {n}", "url": "x"})} if n == 5 else {"txt": f"caption {n}"}
            sink.write({"__key__": f"k{n:03d}", "png": png(10 * n), **text})
    return tmp_path


def test_the_samples_webdataset_reads(shards):
    pattern = str(shards / "s-{00..02}.tar")
    docs = read_documents(pattern)
    assert data_kind(pattern) == "shards" and len(docs) == 10
    reference = list(wds.WebDataset(pattern, shardshuffle=False))
    assert [d.id for d in docs] == [s["__key__"] for s in reference]
    for n, (doc, sample) in enumerate(zip(docs, reference)):
        caption = json.loads(sample["json"])["caption"] if "json" in sample else sample["txt"].decode()
        assert [(s.kind, s.text, s.target) for s in doc.segments] == [("image", None, False), ("text", caption, False)]
        written = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        assert np.array_equal(np.asarray(doc.images[0]), np.asarray(written))
    assert docs[7].origin == "s-01.tar, sample 'k007'"
    assert list(document_texts(docs)) == [f"caption {n}" for n in range(10)]
    for same in (shards, shards / "s-{00,01,02}.tar"):  # a folder, a list
        assert [d.id for d in read_documents(same)] == [d.id for d in docs]
    assert [d.id for d in read_documents(shards / "s-01.tar")] == [f"k{n:03d}" for n in range(4, 8)]


def test_brace_expansion():
    assert expand("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]


def test_indexing_reads_no_contents_and_bad_shards_are_named(shards, tmp_path):
    # a corrupt image opens fine (only headers are read) and is named when a batch reads it
    with tarfile.open(shards / "s-00.tar", "a") as tar:
        for name, data in [("bad.png", b"not a png"), ("bad.txt", b"broken")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    docs = read_documents(shards / "s-00.tar")
    assert len(docs) == 5 and docs[3].id == "k003"
    with pytest.raises(DocumentError, match=r"s-00.tar: s-00.tar, sample 'bad', image: expected a readable image file"):
        docs[4]
    with tarfile.open(shards / "s-03.tar", "w") as tar:
        info = tarfile.TarInfo("lonely.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DocumentError, match=r"s-03.tar, sample 'lonely': expected an image member .* and a .txt or "
                                            r".json caption, got members \['png'\]"):
        read_documents(shards / "s-03.tar")
    with pytest.raises(FileNotFoundError, match=r"expected 6 shard file\(s\), 2 missing, first .*s-04.tar"):
        read_documents(shards / "s-{00..05}.tar")
    with tarfile.open(tmp_path / "z.tar", "w:gz") as tar:
        tar.add(shards / "s-02.tar", arcname="x.png")
    with pytest.raises(DocumentError, match="z.tar: expected an uncompressed tar shard"):
        read_documents(tmp_path / "z.tar")


def ids(batch):
    return [doc.id for doc in batch]


def test_data_loader_workers_share_the_set(shards):
    docs = TarShards(shards)
    loader = torch.utils.data.DataLoader(docs, batch_size=3, num_workers=2, collate_fn=ids)
    assert [i for batch in loader for i in batch] == [d.id for d in docs]


def test_memory_stays_flat_while_reading_every_document(tmp_path):
    """3,000 documents of 32x32 images in shuffled order: resident memory does not grow with the documents read
    (holding them would add about 3,000 x 5 KB: 15 MB, measured)."""
    out = tmp_path / "rss.json"
    subprocess.run([sys.executable, str(BENCH), "--docs", "3000", "--per-shard", "500", "--dir", str(tmp_path / "s"),
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    figures = json.loads(out.read_text())
    assert figures["docs"] == 3000
    assert figures["rss_rise_over_read_mb"] < 4, figures["rss_samples_mb"]
    assert figures["rss_after_index_mb"] - figures["rss_after_imports_mb"] < 4


def test_a_large_set_is_checked_on_a_spread_from_first_to_last(shards):
    docs = TarShards(shards)
    assert checked(docs) is docs  # a small set: every document
    positions = checked(range(100_000))
    assert len(set(positions)) == CHECK_ALL_UP_TO and positions[0] == 0 and positions[-1] == 99_999
    assert max(b - a for a, b in zip(positions, positions[1:])) <= 100_000 // (CHECK_ALL_UP_TO - 1) + 1
