"""Chameleon's document format: documents -> its stream of text and image code spans."""

from __future__ import annotations

from polymodal.config import ConfigError
from polymodal.data.formats import SEPARATOR, Encoded, _labels, _name, _prompt, fit_text
from polymodal.data.processors import images_to_pixels
from polymodal.errors import DocumentError


class ChameleonFormat:
    """Documents -> Chameleon's stream: <bos>, then the segments in order, each text ended by "\\n" (the
    last by <eos>), each image `<img> <image>*n </img>` with its pixels (a last image is followed by
    <eos>). Target text and target images carry labels: the model learns to write both; a target
    image's placeholder labels become its code tokens inside the model (`fusion/writer.py`)."""

    def __init__(self, config, tokenizer):
        if None in (config.image_token_id, config.begin_image_id, config.end_image_id):
            raise ConfigError("documents with images need image_token_id, begin_image_id and end_image_id")
        self.config, self.tokenizer = config, tokenizer
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len

    @staticmethod
    def fit(config, tokenizer):
        """Text tokens from the tokenizer, then the VQ codes right after them."""
        V, ids = tokenizer.vocab_size, tokenizer.special_ids
        text = fit_text(config.text, tokenizer).replace(vocab_size=V + config.vq.num_embeddings)
        return config.replace(text=text, image_tokens=V, image_token_id=ids["<image>"],
                              begin_image_id=ids["<img>"], end_image_id=ids["</img>"])

    def encode(self, doc, prompt_only: bool = False):
        cfg, tok = self.config, self.tokenizer
        segments = [(s, False) for s in _prompt(doc)] if prompt_only else list(zip(doc.segments, doc.target_mask))
        if unreadable := sorted({s.kind for s, _ in segments} - {"text", "image"}):
            raise DocumentError(f"{_name(doc)} has {', '.join(unreadable)} segments; Chameleon reads images and text")
        pieces, images = [([tok.bos_id], False)], []
        for i, (seg, target) in enumerate(segments):
            last = i == len(segments) - 1 and not prompt_only
            if seg.kind == "text":
                text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
                pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
                continue
            span = [cfg.begin_image_id] + [cfg.image_token_id] * cfg.vq.tokens_per_image + [cfg.end_image_id]
            pieces += [(span, target)] + ([([tok.eos_id], target)] if last else [])
            images.append(seg.media)
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)}
        return Encoded(tokens, {"pixel_values": images_to_pixels(images, cfg.vq.resolution)} if images else {})
