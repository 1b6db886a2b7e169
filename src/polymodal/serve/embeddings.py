"""`/v1/embeddings` for the CLIP / SigLIP dual encoders, in OpenAI's response shape.

Each input is a text or an image (a data:image/...;base64 URL, see `protocol.embedding_job`); texts are
laid out as the model trains on captions (`PairFormat.text`, padded by `PairCollator.texts`) and go
through `encode_text`, images through the model's image processor and `encode_image`: the vectors are
the unit embeddings `pm` gives for the same inputs. "float" answers lists of floats, "base64" the
little-endian float32 bytes (what the `openai` client asks for by default and decodes itself).
"""

from __future__ import annotations

import base64
import threading

import torch

from polymodal.serve.protocol import ApiError, EmbeddingJob


class Embedder:
    def __init__(self, model, collator):
        self.model, self.collator = model.eval(), collator
        self.lock = threading.Lock()  # one forward at a time: the model is shared by the server's threads

    def tokens(self, texts: list[str]) -> list[list[int]]:
        ids = [self.collator.format.text(t) for t in texts]
        for i, row in enumerate(ids):
            if len(row) > self.collator.max_len:
                raise ApiError(400, f"text input {i} is {len(row)} tokens; the model's text tower reads at most "
                                    f"{self.collator.max_len}", "input", "context_length_exceeded")
        return ids

    @torch.no_grad()
    def vectors(self, job: EmbeddingJob) -> tuple[list[torch.Tensor], int]:
        """Each input's unit vector, in order, and the text tokens read."""
        texts = [i for i, x in enumerate(job.inputs) if isinstance(x, str)]
        images = [i for i in range(len(job.inputs)) if i not in set(texts)]
        ids = self.tokens([job.inputs[i] for i in texts])
        out: list[torch.Tensor | None] = [None] * len(job.inputs)
        with self.lock:
            if texts:
                batch = self.collator.texts(ids)
                for i, v in zip(texts, self.model.encode_text(batch["input_ids"], batch["attention_mask"])):
                    out[i] = v
            if images:
                pixels = self.collator.format.images([job.inputs[i] for i in images])
                for i, v in zip(images, self.model.encode_image(pixels)):
                    out[i] = v
        return out, sum(map(len, ids))

    def answer(self, job: EmbeddingJob) -> dict:
        vectors, tokens = self.vectors(job)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode() if job.base64
                 else v.float().tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": job.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
