"""The one prompt builder: documents -> `generate`'s inputs, laid out by the model's own document format.

`polymodal generate`, the server and evaluation all ask through `prompts`: each document up to its first
target, encoded as training encodes it, checked against the context with the new tokens asked for (one
message wherever it is raised, naming the option the caller's user set), then padded into a batch.
"""

from __future__ import annotations

import torch

from polymodal.data.documents import Document
from polymodal.errors import InputError


class ContextError(InputError):
    """A prompt and the new tokens asked for that do not fit the model's context."""


def check_context(prompt_len: int, max_new_tokens: int, limit: int, *, flag: str = "max_new_tokens",
                  media: bool = False, whose: str = "the model's context of") -> None:
    if prompt_len + max_new_tokens > limit:
        shown = " (media placeholders included)" if media else ""
        raise ContextError(f"the prompt is {prompt_len} tokens{shown} and {flag} is {max_new_tokens}: "
                           f"{prompt_len + max_new_tokens} in all, past {whose} {limit} tokens")


def prompts(collator, docs: list[Document], max_new_tokens: int | None = None, *,
            flag: str = "max_new_tokens") -> tuple[dict[str, torch.Tensor], int]:
    """The batch `generate` reads for `docs` (right-padded, no labels) and the new tokens each may write:
    max_new_tokens, or when None the rest of the context after the longest prompt (at least 1)."""
    context = collator.format.max_len
    encoded = collator.prompt_encodings(docs)
    longest = max(encoded, key=len)
    wanted = max_new_tokens if max_new_tokens is not None else max(context - len(longest), 1)
    for doc, e in zip(docs, encoded):
        check_context(len(e), wanted, context, flag=flag, media=any(s.kind != "text" for s in doc.segments))
    return collator.prompt_batch(encoded), wanted
