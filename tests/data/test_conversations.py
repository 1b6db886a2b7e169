"""LLaVA conversation JSON and OpenAI-style messages files (JSON and JSON Lines), written as those projects
document them, read through `read_documents`: turns, markers, media, targets, paths, and bad records."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from polymodal.data.documents import Audio, DocumentError, wav_bytes, with_media
from polymodal.data.readers import DataNotFoundError, data_kind, read_documents


@pytest.fixture
def media(tmp_path):
    """Two distinguishable images, three video frames and a wav, in an images/ folder beside the data."""
    (tmp_path / "images").mkdir()
    for name, colour in [("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("f0", (0, 0, 0)), ("f1", (9, 9, 9)),
                         ("f2", (99, 99, 99))]:
        Image.new("RGB", (6, 4), colour).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "images" / "beep.wav").write_bytes(wav_bytes(Audio(np.linspace(-1, 1, 800, dtype=np.float32), 16000)))
    return tmp_path


def layout(doc):
    """(kind, text or the first pixel of an image, target) per segment."""
    return [(s.kind, s.text if s.kind == "text" else s.media.getpixel((0, 0)) if s.kind == "image"
             else len(s.media.waveform) if s.kind == "audio" else len(s.media), s.target) for s in doc.segments]


def test_llava_multi_turn_conversation(media):
    # the layout of LLaVA's llava_v1_5_mix665k.json: "<image>\n" opens the first human turn
    records = [{"id": "000000033471", "image": "images/red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Is it large?"}, {"from": "gpt", "value": "No, small."}]},
        {"id": 7, "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}]
    (media / "llava.json").write_text(json.dumps(records, indent=2))
    assert data_kind(media / "llava.json") == "conversations"
    first, text_only = read_documents(media / "llava.json")
    assert layout(first) == [("image", (255, 0, 0), False), ("text", "What colour is the shape?", False),
                             ("text", "Red.", True), ("text", "Is it large?", False), ("text", "No, small.", True)]
    assert (first.id, first.origin, text_only.id) == ("000000033471", "record [0]", "7")
    assert layout(text_only) == [("text", "Say hi", False), ("text", "hi", True)]


def test_messages_with_images_audios_and_videos(media):
    # LLaMA-Factory's mllm demo layout; a video is a list of frame images
    record = {"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": "Compare <image> and <image>, hear <audio>, watch <video>"},
                           {"role": "assistant", "content": "Red then blue."}],
              "images": ["images/red.png", "images/blue.png"], "audios": ["images/beep.wav"],
              "videos": [["images/f0.png", "images/f1.png", "images/f2.png"]]}
    (media / "m.json").write_text(json.dumps([record]))
    (media / "m.jsonl").write_text(json.dumps(record) + "\n")
    [from_json], [from_jsonl] = read_documents(media / "m.json"), read_documents(media / "m.jsonl")
    expected = [("text", "Answer briefly.", False), ("text", "Compare", False), ("image", (255, 0, 0), False),
                ("text", "and", False), ("image", (0, 0, 255), False), ("text", ", hear", False),
                ("audio", 800, False), ("text", ", watch", False), ("video", 3, False),
                ("text", "Red then blue.", True)]
    assert layout(from_json) == layout(from_jsonl) == expected
    assert (from_jsonl.line, from_json.origin) == (1, "record [0]")


def test_content_parts_and_unmarked_images(media):
    # TRL's layout: content as parts, each image part taking the next image
    parts = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}],
             "images": ["images/blue.png"]}
    # no marker: the image goes first in the first user turn, as LLaVA and ms-swift place it
    unmarked = {"messages": [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "red"}],
                "images": ["images/red.png"]}
    (media / "p.jsonl").write_text(json.dumps(parts) + "\n\n" + json.dumps(unmarked) + "\n")
    a, b = read_documents(media / "p.jsonl")
    assert layout(a) == [("image", (0, 0, 255), False), ("text", "what?", False), ("text", "blue", True)]
    assert layout(b) == [("image", (255, 0, 0), False), ("text", "what?", False), ("text", "red", True)]
    assert (a.line, b.line) == (1, 3)


def test_media_load_later_and_strict_paths(media, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "x.png"
    Image.new("RGB", (2, 2)).save(outside)
    (media / "d.json").write_text(json.dumps([{"image": str(outside), "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}]))
    [doc] = read_documents(media / "d.json", load_media=False)
    assert doc.segments[0].media is None and doc.segments[0].path == str(outside)
    assert with_media(doc, "d.json").segments[0].media.size == (2, 2)
    with pytest.raises(DocumentError, match=r"d.json, record \[0\], image\[0\]: expected a path inside"):
        read_documents(media / "d.json", strict_paths=True)
    outside.unlink()  # a file gone by the time a batch needs it is named with its record and the document's segment
    with pytest.raises(DocumentError, match=r"d.json, record \[0\], segments\[0\].image: expected an existing image"):
        with_media(doc, "d.json")


TURN = [{"role": "user", "content": "<image> q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("record, where, message", [
    ({"messages": TURN, "images": []}, "messages[0].content",
     "expected one image per <image> marker, got more markers than the 0 image(s) of 'images'"),
    ({"messages": TURN, "images": ["images/red.png"] * 2}, "images",
     "expected a <image> marker for each image, got 1 image(s) more than markers"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "messages[0].role", "expected one of human, user, gpt"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "expected a string or a list of parts"),
    ({"messages": []}, "messages", "expected a non-empty list of turns, got an empty list"),
    ({"conversations": [{"from": "human", "value": "<image>"}], "image": 5}, "image[0]",
     "expected a file path string, got a number"),
    ({"messages": [{"role": "user", "content": "<video>"}], "videos": ["clip.mp4"]}, "videos[0]",
     "expected a non-empty list of frame image paths, got the file 'clip.mp4' (video files are not decoded)"),
    ({"messages": TURN, "images": ["images/nowhere.png"]}, "images[0]", "expected an existing image file"),
    ({"segments": [{"text": "q"}]}, "record", "expected a 'conversations' (LLaVA) or 'messages' list, got the "
     "fields ['segments'] (polymodal documents go one per line, in a JSONL file)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<audio>"}],
      "audios": ["images/beep.wav"]}, "messages[1].content", "expected audio only in user turns"),
])
def test_a_bad_record_is_one_line_naming_file_record_and_field(media, record, where, message):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (media / "bad.json").write_text(json.dumps([good, record]))
    expected = f"{re.escape(where)}: {re.escape(message)}"
    with pytest.raises(DocumentError, match=rf"^\S*bad.json, record \[1\], {expected}") as e:
        read_documents(media / "bad.json")
    assert "\n" not in str(e.value)
    (media / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DocumentError, match=rf"^\S*bad.jsonl, line 2, {expected}"):
        read_documents(media / "bad.jsonl")


def test_unreadable_files_are_named(media):
    (media / "cut.json").write_text('[{"messages": [{"role": "user", "content": "q"}]}, {"mess')
    with pytest.raises(DocumentError, match=r"cut.json: expected a JSON list of records, got malformed JSON"):
        read_documents(media / "cut.json")
    (media / "cut.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n{"mess\n')
    with pytest.raises(DocumentError, match=r"cut.jsonl, line 2, document: expected one JSON object, got malformed"):
        read_documents(media / "cut.jsonl")
    with pytest.raises(DataNotFoundError, match="got '.*nowhere.json' \\(no such file\\)") as e:
        read_documents(media / "nowhere.json")
    assert isinstance(e.value, FileNotFoundError)
