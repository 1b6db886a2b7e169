"""Log-probabilities in OpenAI's response shapes (what the batcher reports per token, see
`generation.batching.logprobs`): chat's `logprobs.content` entries ({token, logprob, bytes, top_logprobs}) and the
completions API's `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists.

Every token written has an entry, the stop token included (as `usage.completion_tokens` counts it); a token's
text is its own decoding with control tokens kept, empty for an image code; its `bytes` are the bytes it stands for
(`Tokenizer.token_bytes`), so a character split over several tokens, whose text is U+FFFD, joins back from them.
"""

from __future__ import annotations

from polymodal.data.tokenizer import Tokenizer
from polymodal.generation.batching import Request

Entry = tuple[int, float, list[tuple[int, float]]]  # the token, its log-probability, the most likely (id, logprob)


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False) if token < tokenizer.vocab_size else ""


def chat_logprobs(tokenizer: Tokenizer, entries: list[Entry]) -> dict:
    def one(token: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token) if token < tokenizer.vocab_size else b""
        return {"token": token_text(tokenizer, token), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(token, lp), "top_logprobs": [one(i, v) for i, v in top]} for token, lp, top in entries],
            "refusal": None}


def completion_logprobs(tokenizer: Tokenizer, entries: list[Entry], offset: int = 0) -> tuple[dict, int]:
    """The completions API's lists for `entries`, text offsets counted from `offset` (the characters of the
    tokens before them); returns them and the offset after them."""
    texts, offsets = [], []
    for token, _, _ in entries:
        texts.append(token_text(tokenizer, token))
        offsets.append(offset)
        offset += len(texts[-1])
    top = []
    for _, _, best in entries:  # two ids may decode alike: the more likely one stays
        top.append({})
        for i, v in best:
            top[-1].setdefault(token_text(tokenizer, i), v)
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": top,
            "text_offset": offsets}, offset


class Logprobs:
    """Each choice's entries not yet sent, in the endpoint's shape when taken (None when the request asked for
    none); `entries[i]` takes choice i's as they come."""

    def __init__(self, tokenizer: Tokenizer, requests: list[Request], chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.wanted = requests[0].top_logprobs is not None
        self.entries: list[list[Entry]] = [[] for _ in requests]
        self.offsets = [0] * len(requests)  # completions: characters of the tokens already sent, per choice

    def take(self, i: int) -> dict | None:
        if not self.wanted:
            return None
        entries, self.entries[i] = self.entries[i], []
        if self.chat:
            return chat_logprobs(self.tokenizer, entries)
        out, self.offsets[i] = completion_logprobs(self.tokenizer, entries, self.offsets[i])
        return out
