"""The JSONL fields that serve evaluation: a document's `task` and a target text's `references` round-trip through
write_jsonl/read_jsonl, and a misplaced or malformed one is a DocumentError naming the line and field."""

import json
import re

import pytest

from polymodal.data.documents import Document, DocumentError, Segment, read_jsonl, write_jsonl
from polymodal.data.synthetic import World, export_jsonl


def test_task_and_references_round_trip(tmp_path):
    doc = Document([Segment("text", "what colour?"), Segment("text", "red", target=True, references=["red", "crimson"])],
                   id="a", task="colour")
    write_jsonl([doc, Document([Segment("text", "plain")])], tmp_path / "d.jsonl")
    back = read_jsonl(tmp_path / "d.jsonl")
    assert back[0] == doc and back[0].task == "colour" and back[0].segments[1].references == ["red", "crimson"]
    assert back[1].task is None and back[1].segments[0].references is None


def test_exported_world_documents_carry_their_task(tmp_path):
    examples = export_jsonl(World(seed=0), tmp_path / "w.jsonl", "eval", 6, ["colour", "shape"])
    assert [d.task for d in read_jsonl(tmp_path / "w.jsonl")] == [e.task for e in examples]


@pytest.mark.parametrize("line, where, says", [
    ({"task": 3, "segments": [{"text": "x"}]}, "task", "a string"),
    ({"segments": [{"text": "x", "references": ["y"]}]}, "segments[0].references", "target text segment"),
    ({"segments": [{"text": "x", "target": True, "references": []}]}, "segments[0].references", "an empty list"),
    ({"segments": [{"text": "x", "target": True, "references": ["a", 1]}]}, "segments[0].references", "non-string"),
    ({"segments": [{"text": "x", "target": True, "references": "a"}]}, "segments[0].references", "a string"),
])
def test_a_bad_field_names_its_line_and_place(tmp_path, line, where, says):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"segments": [{"text": "ok"}]}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DocumentError, match=f"line 2, {re.escape(where)}: .*{says}"):
        read_jsonl(path)


def test_references_belong_on_target_text():
    with pytest.raises(ValueError, match="target"):
        Segment("text", "x", references=["x"])
