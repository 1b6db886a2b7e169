"""Every ```json block of README.md is a record `--data` reads as written (tests/test_readme.py runs the python
blocks, tests/test_readme_shell.py the bash ones): saved as the file kind the README shows it in (a JSON list
as a .json file, else one JSONL line), beside the images it names, it reads, and its targets are what the
README says they are (`"target": true` segments, LLaVA's `gpt` turns, the `assistant` messages); and the error the
README quotes for a bad mask is the reader's, word for word."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from polymodal.data.readers import read_documents
from polymodal.errors import DocumentError

README = Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"^```json\n(.*?)^```", README.read_text(), re.S | re.M)
SIZE = (128, 96)  # (width, height): the README's boxes lie inside


def answers(record: dict) -> list:
    """What the README says a record trains on, from the record itself: texts, or (label, box) objects."""
    if "segments" in record:
        return [s["text"] if "text" in s else [(o["label"], tuple(o["box"])) for o in s["boxes"]]
                for s in record["segments"] if s.get("target")]
    if "conversations" in record:
        return [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"]


def test_the_readme_has_json_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_each_json_example_reads_as_written(block, tmp_path):
    text = block.strip()
    listed = text.startswith("[")
    records = json.loads(text) if listed else [json.loads(text)]  # a JSONL example is one line: one record
    for name in re.findall(r'"([\w/.-]+\.(?:png|jpg))"', text):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", SIZE, (200, 30, 30)).save(tmp_path / name)
    path = tmp_path / ("data.json" if listed else "data.jsonl")
    path.write_text(text + "\n")
    docs = read_documents(path)
    assert len(docs) == len(records)
    for doc, record in zip(docs, records):
        targets = [s for s in doc.segments if s.target]
        assert targets and all(s.kind == "text" for s in targets)
        assert [s.text if s.boxes is None else s.boxes for s in targets] == answers(record), (record, doc)
        assert all(len(s.masks) == len(s.boxes) for s in targets if s.masks is not None)  # a mask per object
        assert any(s.kind == "image" and s.media is not None for s in doc.segments)  # its image read


def test_the_mask_error_the_readme_quotes_is_the_one_the_reader_gives(tmp_path, monkeypatch):
    """"Objects: boxes and masks" quotes the error for an RLE mask whose counts overrun its 32x32 image, on line 3
    of data.jsonl: reading such a file gives that line, word for word."""
    quoted = re.search(r"^`(data\.jsonl, line 3, segments\[2\]\.boxes\[0\]\.mask: [^`]+)`\.?$", README.read_text(),
                       re.M)[1]
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32)).save("0.png")
    box = {"label": "cat", "box": [1, 1, 5, 5]}
    line = lambda mask: json.dumps({"segments": [{"image": "0.png"}, {"text": "segment cat"}, {  # noqa: E731
        "boxes": [{**box, **mask}], "target": True}]})
    counts = {"mask": {"size": [32, 32], "counts": [1025]}}
    Path("data.jsonl").write_text("\n".join([line({}), line({}), line(counts)]) + "\n")
    with pytest.raises(DocumentError) as e:
        read_documents("data.jsonl")
    assert str(e.value) == quoted
