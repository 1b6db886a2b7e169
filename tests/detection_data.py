"""A tiny HF PaliGemma directory written by transformers (random weights; its tokenizer holds the location and
segmentation tokens) and detection documents of the user's kind (boxes in pixels), for the e2e detection
fine-tune (tests/e2e/test_detection_finetune.py) and the README's detection commands (tests/test_readme_shell.py)."""

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from polymodal.data.locations import LOC_TOKENS, PALIGEMMA_FIRST_LOC_ID, SEG_TOKENS, add_location_tokens
from polymodal.data.tokenizer import Tokenizer

SIDE, PALIGEMMA_IMAGE_ID, PALIGEMMA_VOCAB = 32, 257152, 257216  # PaliGemma's <image> id and vocabulary size
PROMPT, LABEL, RED, BLUE = "detect red box", "red box", (210, 30, 30), (30, 60, 210)


def write_tokenizer(directory: Path, paligemma_ids: bool) -> int:
    """A byte-level BPE with the location and segmentation tokens. paligemma_ids: laid out as HF's PaliGemma
    tokenizer (its pieces, unused ones up to 256,000, the 1,152 tokens, <image> at 257,152, unused ones up to
    257,216); else appended after its pieces (`add_location_tokens`, which a user's own tokenizer gets). Returns
    the vocabulary size."""
    tok = Tokenizer.train(["detect red box\nred box", "detect blue box\nblue box"] * 20, vocab_size=280)
    if not paligemma_ids:
        add_location_tokens(tok)
        tok.save(directory)
        return tok.vocab_size
    tok.save(directory)
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab, added = spec["model"]["vocab"], spec["added_tokens"]
    image = next(t for t in added if t["content"] == "<image>")
    vocab[f"<unused{image['id']}>"] = image["id"]
    image["id"] = vocab["<image>"] = PALIGEMMA_IMAGE_ID
    for token, i in zip(LOC_TOKENS + SEG_TOKENS, range(PALIGEMMA_FIRST_LOC_ID, PALIGEMMA_IMAGE_ID)):
        vocab[token] = i
        added.append({**image, "id": i, "content": token, "special": False})
    taken = set(vocab.values())
    vocab.update({f"<unused{i}>": i for i in range(PALIGEMMA_VOCAB) if i not in taken})
    added.sort(key=lambda t: t["id"])
    path.write_text(json.dumps(spec))
    return PALIGEMMA_VOCAB


def write_hf_paligemma(directory: Path, paligemma_ids: bool = False) -> None:
    """A tiny random PaliGemma written by transformers (32x32 images in 16 patches), with its tokenizer."""
    import transformers

    vocab = write_tokenizer(directory, paligemma_ids)
    image_token = Tokenizer.from_file(directory).token_id("<image>")
    torch.manual_seed(0)
    config = transformers.PaliGemmaConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SIDE, patch_size=8),
        text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=image_token, projection_dim=64, pad_token_id=0)
    transformers.PaliGemmaForConditionalGeneration(config).save_pretrained(directory)


def scene(box, colour=RED) -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), (250, 250, 250))
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
    return image


def boxes(n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Squares of side 12 whose top-left corner lies on a grid of 4 pixels (36 places)."""
    rng = random.Random(seed)
    corners = [(rng.randrange(0, SIDE - 11, 4), rng.randrange(0, SIDE - 11, 4)) for _ in range(n)]
    return [(x, y, x + 12, y + 12) for x, y in corners]


def write_jsonl(directory: Path, truth: list, colour=RED, label: str = LABEL) -> Path:
    """detect.jsonl in `directory`, one document per box (`detect <label>` -> the box in pixels), its images beside it."""
    lines = []
    for i, box in enumerate(truth):
        scene(box, colour).save(directory / f"{i}.png")
        lines.append({"segments": [{"image": f"{i}.png"}, {"text": f"detect {label}"},
                                   {"boxes": [{"label": label, "box": list(box)}], "target": True}]})
    path = directory / "detect.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def mask_runs(mask) -> list[int]:
    """COCO's run lengths of a (h, w) bool mask: column-major, outside first (a leading 0 if it starts inside)."""
    import numpy as np

    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def compressed_counts(runs: list[int]) -> str:
    """COCO's compressed RLE string of run lengths, written as pycocotools' rleToString writes it."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(48 + (c | 0x20 if more else c)))
    return "".join(out)


def mask_in_each_form(mask, directory: Path, name: str) -> dict[str, object]:
    """One (h, w) bool mask as a JSONL object's "mask" in each form polymodal reads: a PNG file (written in
    `directory`), COCO RLE with list counts and with the compressed string (polygons: `rectangle_polygon`)."""
    import numpy as np

    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, "L").save(directory / f"{name}.png")
    h, w = np.asarray(mask).shape
    runs = mask_runs(mask)
    return {"file": f"{name}.png", "rle": {"size": [h, w], "counts": runs},
            "compressed": {"size": [h, w], "counts": compressed_counts(runs)}}
