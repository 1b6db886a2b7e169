"""Hugging Face `datasets` folders and parquet files, written by the `datasets` library itself (save_to_disk,
to_parquet), read back through `read_documents`: image bytes, both conversation layouts, errors naming rows."""

import datasets
import numpy as np
import pytest
from PIL import Image

from polymodal.data.documents import DocumentError
from polymodal.data.lazy import LazyDocuments, document_texts
from polymodal.data.readers import data_kind, read_documents

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
LLAVA = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(), "conversations": datasets.List(
    {"from": datasets.Value("string"), "value": datasets.Value("string")})})


def image(n: int) -> Image.Image:
    pixels = np.zeros((5, 7, 3), np.uint8)
    pixels[:] = COLOURS[n]
    pixels[n, n] = 255  # no two alike, even in one pixel
    return Image.fromarray(pixels)


def llava_rows():
    return {"id": [f"r{n}" for n in range(3)], "image": [image(n) for n in range(3)],
            "conversations": [[{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": f"c{n}"},
                               {"from": "human", "value": "sure?"}, {"from": "gpt", "value": "yes"}] for n in range(3)]}


def check_llava(docs):
    assert isinstance(docs, LazyDocuments) and len(docs) == 3
    for n, doc in enumerate(docs):
        assert doc.id == f"r{n}" and doc.origin == f"row {n}"
        assert [(s.kind, s.text, s.target) for s in doc.segments] == [
            ("image", None, False), ("text", "what colour?", False), ("text", f"c{n}", True), ("text", "sure?", False),
            ("text", "yes", True)]
        assert np.array_equal(np.asarray(doc.segments[0].media), np.asarray(image(n)))  # PNG bytes, lossless
    assert list(document_texts(docs)) == [t for d in docs for t in d.texts]


def test_llava_layout_from_save_to_disk_and_to_parquet(tmp_path):
    ds = datasets.Dataset.from_dict(llava_rows(), features=LLAVA)
    ds.save_to_disk(str(tmp_path / "folder"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    assert (data_kind(tmp_path / "folder"), data_kind(tmp_path / "rows.parquet")) == ("datasets", "parquet")
    check_llava(read_documents(tmp_path / "folder"))
    check_llava(read_documents(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "sharded"), num_shards=2)  # several Arrow files, read as one table
    check_llava(read_documents(tmp_path / "sharded"))


def test_messages_layout_with_image_lists_and_parts(tmp_path):
    # TRL's llava-instruct-mix layout: content parts, a list of images per row
    part = datasets.Features({"type": datasets.Value("string"), "text": datasets.Value("string")})
    features = datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.List(
        {"role": datasets.Value("string"), "content": datasets.List(part)})})
    rows = {"images": [[image(0), image(1)]], "messages": [[
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "then"},
                                     {"type": "image", "text": None}, {"type": "text", "text": "which is red?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "the first"}]}]]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "trl"))
    [doc] = read_documents(tmp_path / "trl")
    assert [(s.kind, s.text, s.target) for s in doc.segments] == [
        ("image", None, False), ("text", "then", False), ("image", None, False), ("text", "which is red?", False),
        ("text", "the first", True)]
    assert [np.asarray(im)[n, n].tolist() for n, im in enumerate(doc.images)] == [[255] * 3] * 2


def test_splits_bad_rows_and_paths_are_named(tmp_path):
    rows = llava_rows()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=LLAVA),
                          "test": datasets.Dataset.from_dict(rows, features=LLAVA)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DocumentError, match=r"dd holds the splits test, train \(a DatasetDict\): give one split's "
                                            r"folder, e.g. .*dd/test"):
        read_documents(tmp_path / "dd")
    rows["conversations"][2][1]["from"] = "bot"
    datasets.Dataset.from_dict(rows, features=LLAVA).save_to_disk(str(tmp_path / "bad"))
    docs = read_documents(tmp_path / "bad")
    with pytest.raises(DocumentError, match=r"bad, row 2, conversations\[1\].from: expected one of human, user, gpt"):
        docs[2]
    # an image column of paths (bytes left out): the file is read, relative to the folder
    image(1).save(tmp_path / "one.png")
    paths = datasets.Features({**LLAVA, "image": datasets.Value("string")})
    datasets.Dataset.from_dict({**llava_rows(), "image": ["../one.png"] * 3}, features=paths).to_parquet(
        str(tmp_path / "sub" / "paths.parquet"))
    assert np.array_equal(np.asarray(read_documents(tmp_path / "sub" / "paths.parquet")[0].images[0]),
                          np.asarray(image(1)))
    with pytest.raises(DocumentError, match=r"paths.parquet, row 0, image\[0\]: expected a path inside"):
        read_documents(tmp_path / "sub" / "paths.parquet", strict_paths=True)[0]
