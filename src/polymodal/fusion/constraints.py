"""Per-row modality state machine for models that write discrete image tokens (Chameleon, Gemini).

An image in the token stream is `begin`, exactly `length` image codes, then `end`. While sampling,
each row of a batch is in its own mode: in text, image codes and `end` are masked out; after `begin`,
only image codes are allowed until `length` of them are written; then `end` is forced. Rows change
mode independently, so one `generate` call can write text, an image, more text, ... per row, with
the KV cache untouched (forced tokens are fed back like any other).

The state of a row is how many tokens of its open image span remain, counting `end`: 0 in text,
`length + 1` right after `begin`, 1 when only `end` may follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.errors import InputError


@dataclass(frozen=True)
class ImageSpans:
    begin: int | None  # None: the model never opens an image (its codes are always masked)
    end: int | None
    codes: torch.Tensor  # (K,) token id of each image code, in code order
    length: int  # codes per image

    def __post_init__(self) -> None:
        if self.length < 1:
            raise InputError(f"an image span needs length >= 1, got {self.length}")
        if (self.begin is None) != (self.end is None):
            raise InputError(f"give both begin and end image tokens or neither, got {self.begin} and {self.end}")
        if self.begin is not None and bool(torch.isin(torch.tensor([self.begin, self.end]), self.codes).any()):
            raise InputError(f"begin ({self.begin}) and end ({self.end}) tokens must not be image codes")

    def allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """(3, V) bool: the tokens allowed in text, when only `end` may follow, and inside an image. Built
        once per generate call, so decode steps need not read the codes on the host."""
        if int(self.codes.max()) >= vocab_size:
            raise InputError(f"image codes reach token {int(self.codes.max())}, past the vocabulary ({vocab_size})")
        is_code = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        is_code[self.codes.to(device)] = True
        is_end = torch.zeros_like(is_code)
        if self.end is not None:
            is_end[self.end] = True
        return torch.stack((~is_code & ~is_end, is_end, is_code))

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """State (B,) after each row's prompt: a prompt may end inside an image (after `begin`, or
        after some of its codes), and generation then completes that image."""
        B = input_ids.shape[0]
        state = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        if self.begin is None:
            return state
        for b in range(B):
            row = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            opens = (row == self.begin).nonzero()
            if not len(opens):
                continue
            last = int(opens[-1])
            if bool((row[last:] == self.end).any()):
                continue
            written = len(row) - last - 1
            if written > self.length or not bool(torch.isin(row[last + 1:], self.codes.to(row.device)).all()):
                raise InputError(f"prompt {b} ends inside an image span with {written} tokens after begin "
                                 f"({self.begin}) that are not up to {self.length} image codes")
            state[b] = self.length + 1 - written
        return state

    def mask(self, logits: torch.Tensor, state: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, V) -> logits with every token the row's mode forbids set to -inf; allowed: `allowed(V)`."""
        if allowed is None:
            allowed = self.allowed(logits.shape[-1], logits.device)
        mode = torch.where(state > 1, 2, state)  # the row of `allowed`: 0 text, 1 only `end`, 2 inside an image
        return logits.masked_fill(~allowed[mode], float("-inf"))

    def advance(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """The state after each row wrote `token` (B,)."""
        if self.begin is None:
            return state
        return torch.where(state > 0, state - 1, torch.where(token == self.begin, self.length + 1, 0))

    def images(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               new_tokens: torch.Tensor) -> list[list[torch.Tensor]]:
        """Codes (length,) of every image each row completed in `new_tokens` (B, T), in order; an
        image begun in the prompt counts when its `end` is new. Codes are indices into the codebook."""
        if self.begin is None:
            return [[] for _ in range(new_tokens.shape[0])]
        code_of = {int(t): c for c, t in enumerate(self.codes.tolist())}
        out = []
        for b in range(new_tokens.shape[0]):
            prompt = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            row = torch.cat([prompt, new_tokens[b].to(prompt.device)]).tolist()
            ends = [i for i, t in enumerate(row) if t == self.end and i >= len(prompt)]
            found = []
            for i in ends:
                start = i - self.length - 1
                if start >= 0 and row[start] == self.begin and all(t in code_of for t in row[start + 1:i]):
                    found.append(torch.tensor([code_of[t] for t in row[start + 1:i]]))
            out.append(found)
        return out
