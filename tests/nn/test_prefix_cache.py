"""Prefix caching in the paged KV cache: requests that share a prefix (the same image) share its blocks and get
the logits they get alone; another image, or the same image with another prompt in its bidirectional prefix,
never hits; idle cached blocks are evicted least recently used first; a prompt's media end is checked."""

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.errors import InputError
from polymodal.nn.media_cache import content_hash
from polymodal.nn.paged_cache import PagedCache, kv_bytes
from polymodal.nn.prefix_keys import PromptKeys, group_ends
from polymodal.nn.transformer import Decoder


def paligemma():
    torch.manual_seed(0)
    return pm.build("paligemma-tiny").eval()


def request(model, prompt: torch.Tensor, suffix: torch.Tensor, image: torch.Tensor) -> tuple[dict, PromptKeys]:
    """A PaliGemma request: image + <bos> + prompt as the bidirectional prefix (token_type_ids 0), then the
    causal suffix; and its prefix keys (per-token inputs and the image's content hash)."""
    ids = torch.cat([torch.full((16,), model.config.image_token_id), torch.tensor([2]), prompt, suffix])[None]
    types = torch.cat([torch.zeros(17 + len(prompt), dtype=torch.long), torch.ones(len(suffix), dtype=torch.long)])[None]
    inputs = dict(input_ids=ids, token_type_ids=types, pixel_values=image[None])
    return inputs, PromptKeys(dict(input_ids=ids, token_type_ids=types), [(0, 16, content_hash(image))])


def serve(model, cache: PagedCache, seq: int, inputs: dict, keys: PromptKeys) -> tuple[int, torch.Tensor]:
    """Starts the request on what the prefix cache holds and runs the rest: the logits of its uncached tokens."""
    hit = cache.add(seq, keys)
    with torch.no_grad():
        if hit:
            return hit, model.decode(inputs["input_ids"][:, hit:], cache.batch([seq]), logits_to_keep=0).logits
        return hit, model.prefill(cache=cache.batch([seq]), logits_to_keep=0, **inputs).logits


def test_requests_about_the_same_image_share_its_blocks_and_logits():
    model = paligemma()
    image, prompt = torch.randn(3, 32, 32), torch.randint(3, 500, (7,))  # a prefix of 16 + 1 + 7 = 24 tokens
    cache = PagedCache.for_model(model, 64, 8)
    a, keys_a = request(model, prompt, torch.randint(3, 500, (5,)), image)
    assert serve(model, cache, 0, a, keys_a)[0] == 0
    b, keys_b = request(model, prompt, torch.randint(3, 500, (4,)), image)
    hit, logits = serve(model, cache, 1, b, keys_b)
    assert hit == 24  # the whole prefix: three blocks of 8
    assert cache.tables[1][:3] == cache.tables[0][:3] and cache.tables[1][3] != cache.tables[0][3]
    assert all(cache.pool.refs[block] == 2 for block in cache.tables[0][:3])
    with torch.no_grad():
        alone = model(**b).logits[:, 24:]
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    assert (cache.hit_tokens, cache.prompt_tokens) == (24, 29 + 28)
    assert cache.bytes_held([0, 1]) == cache.bytes_held() == kv_bytes(5 * 8, 3, 1, 32, torch.float32)  # 4 + 4 - 3 shared


def test_another_image_or_prompt_never_hits():
    model = paligemma()
    image, prompt, suffix = torch.randn(3, 32, 32), torch.randint(3, 500, (7,)), torch.randint(3, 500, (3,))
    cache = PagedCache.for_model(model, 64, 8)
    serve(model, cache, 0, *request(model, prompt, suffix, image))
    other = image.clone()
    other[0, 0, 0] += 1e-3  # one value of one pixel
    assert serve(model, cache, 1, *request(model, prompt, suffix, other))[0] == 0
    # the image's own tokens see the whole bidirectional prefix, so another prompt changes their K/V too
    changed = prompt.clone()
    changed[-1] = (changed[-1] + 1) % 500
    assert serve(model, cache, 2, *request(model, changed, suffix, image))[0] == 0
    assert serve(model, cache, 3, *request(model, prompt, suffix, image))[0] == 24


def test_text_prefix_hits_whole_blocks_and_idle_blocks_are_evicted_least_recent_first():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                  max_seq_len=64)).eval()
    cache = PagedCache.for_model(model, 7, 4)  # 6 usable blocks

    def text(seq: int, ids: torch.Tensor) -> int:
        hit, logits = serve(model, cache, seq, dict(input_ids=ids), PromptKeys(dict(input_ids=ids)))
        with torch.no_grad():
            torch.testing.assert_close(logits, model(ids).logits[:, hit:], atol=1e-5, rtol=1e-5)
        return hit

    first = torch.randint(0, 97, (1, 13))
    assert text(0, first) == 0
    cache.free(0)  # its 3 full blocks stay cached, idle; the partial one is free
    second = torch.cat([first[:, :10], torch.randint(0, 97, (1, 2))], 1)
    assert text(1, second) == 8  # blocks 0 and 1 match; block 2 holds the tokens that differ
    cache.free(1)
    # idle, least recent first: first's block 2 (since free(0)), blocks 0 and 1 and second's block 2 (free(1))
    assert text(2, torch.randint(0, 97, (1, 12))) == 0  # 3 blocks: the 2 free ones, then first's block 2 evicted
    cache.free(2)
    assert text(3, first) == 8  # blocks 0 and 1 are still cached; block 2 went


def test_a_prompt_whose_model_call_failed_is_never_shared():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=64)).eval()
    cache = PagedCache.for_model(model, 16, 4)
    ids = torch.randint(0, 97, (1, 9))
    keys = PromptKeys(dict(input_ids=ids))
    for seq, failed, hit in ((0, True, 0), (1, False, 0), (2, False, 8)):
        assert serve(model, cache, seq, dict(input_ids=ids), keys)[0] == hit
        cache.free(seq, failed=failed)


def test_group_ends():
    assert group_ends([1, 2, 2, 2, 3, 4, 4]) == [1, 4, 4, 4, 5, 7, 7]


def test_media_end_lies_between_the_last_media_token_and_the_prompt_end():
    """A wrapped span's end token counts in `media_end` (a cut there keeps the span whole); a media_end inside
    the span or past the prompt is refused, naming both."""
    ids = torch.arange(10)[None]
    media = [(3, 4, b"digest")]  # tokens 3..6, its end token at 7
    assert PromptKeys(dict(input_ids=ids), media).media_end == 7
    assert PromptKeys(dict(input_ids=ids), media, media_end=8).media_end == 8
    for wrong in (6, 11):
        with pytest.raises(InputError, match=f"media_end {wrong} after media tokens up to 7"):
            PromptKeys(dict(input_ids=ids), media, media_end=wrong)
