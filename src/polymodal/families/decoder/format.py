"""The text-only decoder LMs' document layout (Llama, Gemma): the text of a document's segments in order."""

from __future__ import annotations

from polymodal.config import DecoderConfig
from polymodal.data.documents import Document
from polymodal.data.formats import SEPARATOR, Encoded, _labels, _name, _prompt, fit_text
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import DocumentError


class DecoderFormat:
    """Text-only decoder LMs: <bos> text <sep> text ... <eos>; labels on target text.

    A separator or the final <eos> is a label when the segment before it is a target, so the
    model learns where an answer ends."""

    def __init__(self, config: DecoderConfig, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.max_seq_len

    fit = staticmethod(fit_text)

    def encode(self, doc: Document, prompt_only: bool = False) -> Encoded:
        kinds = sorted({s.kind for s in doc.segments} - {"text"})
        if kinds:
            raise DocumentError(f"{_name(doc)} has {', '.join(kinds)} segments; a text-only decoder reads text only")
        tok = self.tokenizer
        segments = list(zip(doc.segments, doc.target_mask))
        if prompt_only:
            segments = [(s, False) for s in _prompt(doc)]
        pieces = [([tok.bos_id], False)]
        for i, (seg, target) in enumerate(segments):
            last = i == len(segments) - 1 and not prompt_only
            text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
            pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
        return Encoded({"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)})
