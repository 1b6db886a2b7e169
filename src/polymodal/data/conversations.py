"""Conversation records -> `Document`s: the two layouts people train multimodal chat models on.

LLaVA (Liu et al. 2023, the `llava_v1_5_mix665k.json` layout; LLaMA-Factory's "sharegpt"):

    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red cup."}]}

OpenAI-style messages (the layout LLaMA-Factory and ms-swift read; TRL's datasets):

    {"messages": [{"role": "user", "content": "<image>What is on the table?"},
                  {"role": "assistant", "content": "A red cup."}],
     "images": ["coco/000001.jpg"]}

A turn's text is split at its `<image>`, `<audio>` and `<video>` markers, which take the record's media of
that kind in order (`image` may be one path or a list; `images`, `audios`, `videos` lists; a video is a
list of frame images). A record with media and no marker of that kind gets them at the start of its first
user turn, as LLaVA and ms-swift place them. A `content` may also be a list of parts
(`{"type": "text", "text": ...}`, `{"type": "image"}`, ...), each media part taking the next medium.
Assistant turns are targets (the loss goes on them only); user and system turns are the prompt. Media in
an assistant turn is an image the model learns to draw. Fields other than these are ignored.

`conversation_document(record, resolve)` builds the document; `resolve(kind, value, where)` turns one
medium as the record gives it (a path; bytes in a table) into (media, path), so files and tables share it.
Problems raise `_Invalid(where, message)`, which the reader turns into a line naming file and record.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from polymodal.data.documents import Document, Segment, _Invalid, _type

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MEDIA_KEYS = {"image": "images", "audio": "audios", "video": "videos"}  # segment kind -> the record's list
MARKERS = re.compile(r"(<image>|<audio>|<video>)")
LAYOUTS = {"conversations": ("from", "value"), "messages": ("role", "content")}  # turn list -> (role, text) keys

Resolve = Callable[[str, Any, str], tuple[Any, Any]]


def is_conversation(record: Any) -> bool:
    return isinstance(record, dict) and any(key in record for key in LAYOUTS)


def conversation_document(record: Any, resolve: Resolve) -> Document:
    if not isinstance(record, dict):
        raise _Invalid("record", f"expected a JSON object, got {_type(record)}")
    layout = next((key for key in LAYOUTS if key in record), None)
    if layout is None:
        hint = " (polymodal documents go one per line, in a JSONL file)" if "segments" in record else ""
        raise _Invalid("record", f"expected a 'conversations' (LLaVA) or 'messages' list, got the fields "
                                 f"{sorted(record)}{hint}")
    turns = record[layout]
    if not isinstance(turns, list) or not turns:
        given = "an empty list" if turns == [] else _type(turns)
        raise _Invalid(layout, f"expected a non-empty list of turns, got {given}")
    media = _media(record)
    given = {kind: len(items) for kind, items in media.items()}
    parts = [_turn(turn, f"{layout}[{i}]", layout) for i, turn in enumerate(turns)]
    if isinstance(record.get("system"), str) and record["system"].strip():
        parts.insert(0, ("system", [("text", record["system"].strip())], "system"))
    _place_unmarked(parts, media)
    segments = []
    for role, pieces, where in parts:
        for kind, value in pieces:
            if kind == "text":
                segments.append(Segment("text", text=value, target=role == "assistant"))
                continue
            if not media[kind]:
                raise _Invalid(where, f"expected one {kind} per <{kind}> marker, got more markers than the "
                                         f"{given[kind]} {kind}(s) of '{_field(record, kind)}'")
            index, value = media[kind].pop(0)
            if role == "assistant" and kind != "image":
                raise _Invalid(where, f"expected {kind} only in user turns (a model writes text and images), "
                                         f"got it in an assistant turn")
            loaded, path = resolve(kind, value, f"{_field(record, kind)}[{index}]")
            segments.append(Segment(kind, media=loaded, path=path, target=role == "assistant"))
    if left := {kind: len(items) for kind, items in media.items() if items}:
        kind = next(iter(left))
        raise _Invalid(_field(record, kind), f"expected a <{kind}> marker for each {kind}, got {left[kind]} "
                                                f"{kind}(s) more than markers")
    if not segments:
        raise _Invalid(layout, "expected some text or media, got only empty turns")
    doc_id = record.get("id")
    return Document(segments, None if doc_id is None else str(doc_id))


def _field(record: dict, kind: str) -> str:
    return "image" if kind == "image" and "image" in record and "images" not in record else MEDIA_KEYS[kind]


def _media(record: dict) -> dict[str, list[tuple[int, Any]]]:
    """kind -> [(index in its list, value)]: what the markers take, in order."""
    out = {}
    for kind, key in MEDIA_KEYS.items():
        items = record.get(key)
        if kind == "image" and items is None and record.get("image") is not None:
            items = record["image"] if isinstance(record["image"], list) else [record["image"]]
            key = "image"
        if items is None:
            items = []
        if not isinstance(items, list):
            raise _Invalid(key, f"expected a list of {kind}s, got {_type(items)}")
        out[kind] = list(enumerate(items))
    return out


def _turn(turn: Any, where: str, layout: str) -> tuple[str, list[tuple[str, Any]], str]:
    """(role, [(kind, text or None)], where) of one turn."""
    role_key, text_key = LAYOUTS[layout]
    if not isinstance(turn, dict):
        raise _Invalid(where, f"expected a turn object with '{role_key}' and '{text_key}', got {_type(turn)}")
    role = turn.get(role_key)
    if role not in ROLES:
        raise _Invalid(f"{where}.{role_key}", f"expected one of {', '.join(ROLES)}, got {role!r}")
    content = turn.get(text_key)
    where = f"{where}.{text_key}"
    if isinstance(content, str):
        return ROLES[role], _split(content), where
    if isinstance(content, list):
        return ROLES[role], [_part(part, f"{where}[{j}]") for j, part in enumerate(content)], where
    raise _Invalid(where, f"expected a string or a list of parts, got {_type(content)}")


def _split(text: str) -> list[tuple[str, Any]]:
    pieces = []
    for piece in MARKERS.split(text):
        if MARKERS.fullmatch(piece):
            pieces.append((piece[1:-1], None))
        elif piece.strip():  # the newline LLaVA puts after "<image>" is no text of its own
            pieces.append(("text", piece.strip()))
    return pieces


def _part(part: Any, where: str) -> tuple[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return "text", part["text"]
    if kind in MEDIA_KEYS:
        return kind, None
    raise _Invalid(where, f"expected a text, image, audio or video part, got {str(part)[:80]}")


def _place_unmarked(parts: list, media: dict) -> None:
    """Media of a kind that no turn marks goes first in the first user turn."""
    marked = {kind for _, pieces, _ in parts for kind, _ in pieces}
    unmarked = [(kind, None) for kind in MEDIA_KEYS for _ in media[kind] if kind not in marked]
    user = next((p for p in parts if p[0] == "user"), None)
    if unmarked and user is not None:
        user[1][:0] = unmarked
