"""The one prompt builder: documents -> `generate`'s inputs, laid out by the model's own document format.

`polymodal generate`, the server and evaluation all ask through `prompts`: each document up to its first
target, encoded as training encodes it, then padded into a batch. The prompt and the new tokens asked for are
checked against the context once, where they are used (`generate`, the batcher: `check_context`); a caller
rewords the one `ContextError` with the name its user gave the new tokens.
"""

from __future__ import annotations

import torch

from polymodal.data.documents import Document
from polymodal.errors import InputError
from polymodal.families import spec_of


class ContextError(InputError):
    """A prompt and the new tokens asked for that do not fit the model's context. Raised once, by the guard of
    `generate` or the batcher; a caller whose user named the new tokens otherwise rewords it (`named`)."""

    def __init__(self, prompt_len: int, max_new_tokens: int, limit: int, *, flag: str = "max_new_tokens",
                 media: bool = False, whose: str = "the model's context of", note: str = ""):
        self.numbers = dict(prompt_len=prompt_len, max_new_tokens=max_new_tokens, limit=limit, media=media)
        shown = " (media placeholders included)" if media else ""
        super().__init__(f"the prompt is {prompt_len} tokens{shown} and {flag} is {max_new_tokens}: "
                         f"{prompt_len + max_new_tokens} in all, past {whose} {limit} tokens{note}")

    def named(self, flag: str, *, note: str = "") -> ContextError:
        """The same error, the new tokens called `flag` (the option the caller's user set), past the model's
        context, `note` after it."""
        return ContextError(**self.numbers, flag=flag, note=note)


def check_vocabulary(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A clear error unless every token id of the prompt lies in the vocabulary (checked by `generate` and the
    batcher before any compute)."""
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if input_ids.numel() and bool(bad.any()):
        raise InputError(f"input_ids must be token ids in [0, {vocab_size}) (the vocabulary); got "
                         f"{input_ids[bad].unique()[:5].tolist()}")


def has_media(model, inputs: dict) -> bool:
    """Whether a model's inputs give media: a tensor (or a list of them) beside input_ids and the family's per-token
    inputs. An option (PaliGemma's `interpolate_pos_encoding`) is not one."""
    per_token = spec_of(model).per_token_inputs
    return any(k != "input_ids" and k not in per_token and
               (torch.is_tensor(v) or isinstance(v, (list, tuple)) and any(map(torch.is_tensor, v)))
               for k, v in inputs.items())


def check_context(prompt_len: int, max_new_tokens: int, limit: int, *, media: bool = False,
                  whose: str = "the model's context of") -> None:
    if prompt_len + max_new_tokens > limit:
        raise ContextError(prompt_len, max_new_tokens, limit, media=media, whose=whose)


def prompts(collator, docs: list[Document], max_new_tokens: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """The batch `generate` reads for `docs` (right-padded, no labels) and the new tokens each may write:
    max_new_tokens, or when None the rest of the context after the longest prompt (at least 1). Their length
    against the context is checked once, by `generate` or the batcher."""
    context = collator.format.max_len
    encoded = collator.prompt_encodings(docs)
    wanted = max_new_tokens if max_new_tokens is not None else max(context - len(max(encoded, key=len)), 1)
    return collator.prompt_batch(encoded), wanted
