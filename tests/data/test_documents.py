import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from polymodal.data import documents
from polymodal.data.documents import Audio, Document, DocumentError, Segment, read_jsonl, write_jsonl


def image(seed: int = 0, size: int = 8) -> Image.Image:
    px = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(px, "RGB")


def audio(seed: int = 0, n: int = 400) -> Audio:
    x = np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32)
    return Audio(x, 16_000)


def all_kinds() -> Document:
    return Document([
        Segment("image", media=image(1)),
        Segment("text", "what colour is the shape?"),
        Segment("audio", media=audio(2)),
        Segment("video", media=[image(3), image(4), image(5)]),
        Segment("text", "red", target=True),
    ], id="doc-0")


def assert_same(a: Document, b: Document) -> None:
    assert a.id == b.id
    def fields(d: Document) -> list[tuple]:
        return [(s.kind, s.text, s.target) for s in d.segments]

    assert fields(a) == fields(b)
    for x, y in zip(a.segments, b.segments):
        if x.kind == "image":
            assert np.array_equal(np.asarray(x.media), np.asarray(y.media))
        elif x.kind == "video":
            assert len(x.media) == len(y.media)
            for fx, fy in zip(x.media, y.media):
                assert np.array_equal(np.asarray(fx), np.asarray(fy))
        elif x.kind == "audio":
            assert x.media.sample_rate == y.media.sample_rate
            assert y.media.waveform.dtype == np.float32
            np.testing.assert_allclose(x.media.waveform, y.media.waveform, rtol=0, atol=1 / 32767)


def test_round_trip_all_kinds(tmp_path):
    docs = [all_kinds(), Document([Segment("text", "plain pretraining text")])]
    write_jsonl(docs, tmp_path / "docs.jsonl")
    back = read_jsonl(tmp_path / "docs.jsonl")
    assert len(back) == 2
    for a, b in zip(docs, back):
        assert_same(a, b)
    # media live beside the JSONL under relative paths
    line = json.loads((tmp_path / "docs.jsonl").read_text().splitlines()[0])
    assert line["segments"][0]["image"].startswith("docs_media/")
    assert all(not os.path.isabs(p) for p in line["segments"][3]["video"])


def test_relative_paths_resolve_against_the_jsonl_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "data" / "images").mkdir(parents=True)
    image(7).save(tmp_path / "data" / "images" / "a.png")
    (tmp_path / "data" / "d.jsonl").write_text(json.dumps({"segments": [{"image": "images/a.png"}]}) + "\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    [doc] = read_jsonl(tmp_path / "data" / "d.jsonl")
    assert np.array_equal(np.asarray(doc.images[0]), np.asarray(image(7)))


def test_images_come_back_rgb(tmp_path):
    Image.new("L", (4, 4), 200).save(tmp_path / "grey.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"segments": [{"image": "grey.png"}]}))
    [doc] = read_jsonl(tmp_path / "d.jsonl")
    assert doc.images[0].mode == "RGB"
    assert np.asarray(doc.images[0])[0, 0].tolist() == [200, 200, 200]


def test_blank_lines_are_skipped_and_still_counted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"segments": [{"text": "a"}]}\n\n   \n{"segments": [{"text": "b"}]}\n{"segments": 3}\n')
    with pytest.raises(DocumentError, match="line 5"):
        read_jsonl(p)
    p.write_text('{"segments": [{"text": "a"}]}\n\n   \n{"segments": [{"text": "b"}]}\n')
    assert [(d.texts, d.line) for d in read_jsonl(p)] == [(["a"], 1), (["b"], 4)]  # errors found later can name it


def test_helpers_and_target_mask():
    doc = all_kinds()
    assert doc.texts == ["what colour is the shape?", "red"]
    assert len(doc.images) == 1 and len(doc.audios) == 1 and len(doc.videos) == 1
    assert doc.target_mask == [False, False, False, False, True]
    # no target marked: all text is trained on (interleaved pretraining), media never
    plain = Document([Segment("image", media=image()), Segment("text", "a"), Segment("text", "b")])
    assert plain.target_mask == [False, True, True]
    # an image to draw (text -> image): only the image is a target
    draw = Document([Segment("text", "draw a red circle"), Segment("image", media=image(), target=True)])
    assert draw.target_mask == [False, True]


def test_load_media_false_reads_only_paths(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(
        {"segments": [{"image": "nowhere.png"}, {"video": ["f0.png", "f1.png"]}, {"text": "hi"}]}))
    [doc] = read_jsonl(tmp_path / "d.jsonl", load_media=False)
    assert doc.segments[0].media is None and doc.segments[0].path == str(tmp_path / "nowhere.png")
    assert doc.segments[1].path == [str(tmp_path / "f0.png"), str(tmp_path / "f1.png")]
    with pytest.raises(ValueError, match="no media loaded"):
        write_jsonl([doc], tmp_path / "out.jsonl")


def test_segment_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="kind"):
        Segment("picture")
    with pytest.raises(ValueError, match="needs text"):
        Segment("text")
    with pytest.raises(ValueError, match="only text and image segments can be targets, got a target audio"):
        Segment("audio", media=Audio(np.zeros(4, np.float32), 16000), target=True)


def seg(segment: str) -> str:
    """A document line whose second segment (index 1) is `segment`."""
    return '{"segments": [{"text": "a"}, ' + segment + "]}"


# Each bad line goes on line 2, after a good line, so the test sees the line count is right.
BAD = {  # case: (line, field named, what the message must say)
    "malformed json": ('{"segments": [', "document", "malformed JSON"),
    "not an object": ("[1, 2]", "document", "got a list"),
    "missing segments": ('{"id": "x"}', "segments", "no 'segments' field"),
    "segments not a list": ('{"segments": {"text": "a"}}', "segments", "got an object"),
    "empty segments": ('{"segments": []}', "segments", "got an empty list"),
    "unknown document field": ('{"segments": [{"text": "a"}], "meta": 1}', "meta", "unknown field 'meta'"),
    "id not a string": ('{"id": 3, "segments": [{"text": "a"}]}', "id", "expected a string, got a number"),
    "segment not an object": (seg('"b"'), "segments[1]", "got a string"),
    "unknown segment key": (seg('{"txt": "b"}'), "segments[1].txt", "unknown key 'txt'"),
    "no kind key": (seg('{"target": true}'), "segments[1]", "got none"),
    "two kind keys": (seg('{"text": "b", "image": "i.png"}'), "segments[1].image", "got 'text' and 'image'"),
    "text not a string": (seg('{"text": 5}'), "segments[1].text", "got a number"),
    "target not a bool": (seg('{"text": "b", "target": 1}'), "segments[1].target", "true or false, got a number"),
    "target on audio": (seg('{"audio": "gone.wav", "target": true}'), "segments[1].target",
                        "only on text or image segments, got it on a segment of kind 'audio'"),
    "image path not a string": (seg('{"image": ["good.png"]}'), "segments[1].image", "path string, got a list"),
    "missing image": (seg('{"image": "gone.png"}'), "segments[1].image", "missing file"),
    "image path is a directory": (seg('{"image": "media"}'), "segments[1].image", "got directory"),
    "audio path is a directory": (seg('{"audio": "media"}'), "segments[1].audio", "got directory"),
    "corrupt image": (seg('{"image": "corrupt.png"}'), "segments[1].image", "expected a readable image file"),
    "truncated image": (seg('{"image": "truncated.png"}'), "segments[1].image", "expected a readable image file"),
    "missing audio": (seg('{"audio": "gone.wav"}'), "segments[1].audio", "missing file"),
    "corrupt audio": (seg('{"audio": "corrupt.wav"}'), "segments[1].audio",
                      "expected a wav file of PCM or float samples"),
    "mu-law audio": (seg('{"audio": "mulaw.wav"}'), "segments[1].audio", "mu-law-encoded samples; expected PCM or"),
    "empty video": (seg('{"video": []}'), "segments[1].video", "got an empty list"),
    "video not a list": (seg('{"video": "good.png"}'), "segments[1].video", "got a string"),
    "bad video frame": (seg('{"video": ["good.png", "corrupt.png"]}'), "segments[1].video[1]",
                        "expected a readable image file"),
}


@pytest.mark.parametrize("case", BAD)
def test_validation_errors_name_file_line_and_field(tmp_path, case):
    image().save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:-30])
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF????WAVEjunk")
    (tmp_path / "mulaw.wav").write_bytes(b"RIFF\x2c\0\0\0WAVEfmt \x10\0\0\0\x07\0\x01\0\x40\x1f\0\0\x40\x1f\0\0"
                                         b"\x01\0\x08\0data\x04\0\0\0\0\0\0\0")
    (tmp_path / "media").mkdir()
    line, field, expected = BAD[case]
    p = tmp_path / "docs.jsonl"
    p.write_text('{"segments": [{"image": "good.png"}, {"text": "fine"}]}\n' + line + "\n")
    with pytest.raises(DocumentError) as info:
        read_jsonl(p)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(p) in msg and "line 2" in msg, msg
    assert f"{field}:" in msg and expected in msg, msg


@pytest.mark.parametrize("name", ["corrupt.png", "corrupt.wav"])
def test_media_errors_chain_the_original_exception(tmp_path, name):
    (tmp_path / name).write_bytes(b"garbage")
    kind = "image" if name.endswith("png") else "audio"
    (tmp_path / "d.jsonl").write_text(json.dumps({"segments": [{kind: name}]}))
    with pytest.raises(DocumentError) as info:
        read_jsonl(tmp_path / "d.jsonl")
    assert info.value.__cause__ is not None and not isinstance(info.value.__cause__, DocumentError)


def test_wav_round_trip_clips_and_quantises(tmp_path):
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 1e-6], dtype=np.float32)
    (tmp_path / "a.wav").write_bytes(documents.wav_bytes(Audio(x, 22_050)))
    back = documents.read_wav(tmp_path / "a.wav")
    assert back.sample_rate == 22_050
    np.testing.assert_allclose(back.waveform, np.clip(x, -1, 1), atol=0.5 / 32767)
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert (w.getsampwidth(), w.getnchannels()) == (2, 1)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "docs.jsonl"
    write_jsonl([all_kinds()], p)
    assert temp_files(tmp_path) == []
    before = p.read_bytes()

    def failing():
        yield Document([Segment("text", "first")])
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_jsonl(failing(), p)
    assert p.read_bytes() == before  # the old file is untouched, not half overwritten
    assert temp_files(tmp_path) == []
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)


def test_write_makes_missing_folders_and_refuses_a_directory(tmp_path):
    write_jsonl([all_kinds()], tmp_path / "new" / "folder" / "docs.jsonl")
    [doc] = read_jsonl(tmp_path / "new" / "folder" / "docs.jsonl")
    assert_same(doc, all_kinds())
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match="expected a .jsonl file to write, got the directory"):
        write_jsonl([all_kinds()], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # no media written beside it


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=4),
       targets=st.lists(st.booleans(), min_size=4, max_size=4), doc_id=st.none() | st.text())
def test_any_text_round_trips(tmp_path_factory, texts, targets, doc_id):
    doc = Document([Segment("text", t, target=g) for t, g in zip(texts, targets)], id=doc_id)
    p = tmp_path_factory.mktemp("h") / "t.jsonl"
    write_jsonl([doc], p)
    assert read_jsonl(p) == [doc]
