"""Cache-aware admission (SGLang's cache-aware scheduling): a waiting request whose prefix a request admitted beside
it (or still prefilling in chunks) is writing waits until that prefix is filed and starts on the hit; requests
about the same image submitted at once all hit but the first, in the same step, and answer as `generate` alone;
another image, another bidirectional prefix or another text is not held; a short share with a long chunked
prompt is not worth the wait; a held request keeps its place and prefills itself when its writer is cancelled
or fails; the group ends a prompt is keyed with before its prefill are those the prefill writes."""

import pytest
import torch

import polymodal as pm
from polymodal.generation.batching import Batcher, Request
from polymodal.generation.prompt_keys import prompt_keys
from polymodal.nn.paged_cache import PagedCache
from polymodal.nn.prefix_keys import PromptKeys, group_ends
from test_batching import DECODER, N_IMAGE, PALIGEMMA, image_prompt


def alone(model, inputs: dict, request: Request) -> list[int]:
    return pm.generate(model, **inputs, max_new_tokens=request.max_new_tokens)[0].tolist()


def drain(batcher: Batcher) -> None:
    while not batcher.idle():
        batcher.step()
    assert batcher.cache.pool.in_use == 0 and not batcher.cache.tables  # every block came back


def text(*parts: torch.Tensor) -> dict:
    return {"input_ids": torch.cat(parts)[None]}


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(6, 90, (n,), generator=torch.Generator().manual_seed(seed))


def test_requests_about_one_image_submitted_at_once_all_hit_but_the_first_in_the_same_step():
    g = torch.Generator().manual_seed(1)
    image, prefix = torch.randn(3, 32, 32, generator=g), torch.randint(6, 90, (8,), generator=g)
    other = image.clone()
    other[0, 0, 0] += 1e-3
    sharers = [image_prompt(image, prefix, torch.randint(6, 90, (n,), generator=g)) for n in (5, 9, 6, 3)]
    others = [image_prompt(other, prefix, sharers[0]["input_ids"][0, N_IMAGE + 8:]),  # another image
              image_prompt(image, prefix.flip(0), sharers[1]["input_ids"][0, N_IMAGE + 8:])]  # another prefix
    inputs = [sharers[0], others[0], *sharers[1:], others[1]]
    batcher = Batcher(PALIGEMMA, slots=8, max_len=64, block_size=4)
    requests = [Request(x, max_new_tokens=6) for x in inputs]
    batcher.submit(*requests)
    batcher.step()
    # every request has its first token after one step: the sharers were held only until the first one's prefill
    # in that step filed the image and prefix, then started on them
    assert all(r.tokens for r in requests) and not batcher.waiting
    cache = batcher.cache
    tables = [cache.tables[s.seq] for s in batcher.seqs if s is not None]
    shared = (N_IMAGE + 8) // 4  # 16 image + 8 prefix tokens: 6 whole blocks of 4
    writer = tables[0][:shared]
    assert sum(table[:shared] == writer for table in tables) == len(sharers)
    assert all(cache.pool.refs[block] == len(sharers) for block in writer)
    assert cache.hit_tokens == (len(sharers) - 1) * shared * 4
    assert cache.prompt_tokens == sum(x["input_ids"].shape[1] for x in inputs)
    drain(batcher)
    for x, request in zip(inputs, requests):
        assert request.tokens == alone(PALIGEMMA, x, request)


def test_a_request_waits_for_a_prefix_prefilled_in_chunks_while_others_go_first():
    # the writer's 16 tokens run in packed chunks of 8 over two steps; `shares` has its first 12 (3 blocks of 4), as
    # many tokens as its own prefill would run in two steps: it waits for them. `short` shares 4 tokens (one
    # block), one chunk's worth: not worth two steps. `other` shares nothing.
    start = tokens(16, 2)
    writer, shares = text(start), text(start[:12], tokens(7, 3))
    short, other = text(start[:4], tokens(10, 4)), text(tokens(9, 5))
    batcher = Batcher(DECODER, slots=6, max_len=64, block_size=4, prefill_chunk=8)
    requests = [Request(x, max_new_tokens=5) for x in (writer, shares, short, other)]
    batcher.submit(*requests)
    batcher.step()
    assert list(batcher.waiting) == [requests[1]]  # held; the ones behind it went first
    assert batcher.cache.hit_tokens == 0
    batcher.step()  # the writer's last chunk
    assert list(batcher.waiting) == [requests[1]]
    batcher.step()  # filed: it starts on the hit
    assert not batcher.waiting and batcher.cache.hit_tokens == 12
    drain(batcher)
    assert batcher.cache.hit_tokens == 12
    for x, request in zip((writer, shares, short, other), requests):
        assert request.tokens == alone(DECODER, x, request)


def test_a_held_request_prefills_itself_when_its_writer_is_cancelled():
    start = tokens(16, 6)
    writer = text(start)  # 2 packed chunks of 8: as many steps as the held request's own 12 cached tokens would take
    shares = text(start[:16], tokens(3, 7))
    batcher = Batcher(DECODER, slots=4, max_len=64, block_size=4, prefill_chunk=8)
    first, held = Request(writer, max_new_tokens=5), Request(shares, max_new_tokens=5)
    batcher.submit(first, held)
    batcher.step()
    assert list(batcher.waiting) == [held]
    first.cancelled = True
    drain(batcher)
    assert first.finish_reason == "cancelled"
    assert held.finish_reason == "length" and held.tokens == alone(DECODER, shares, held)
    assert batcher.cache.hit_tokens == 0  # nothing was filed: it ran its whole prompt


def test_a_prompt_the_model_refuses_takes_no_hit_and_fails_alone():
    # a text prompt whose cached prefix is found but whose rest the model refuses (a token past the vocabulary):
    # the packed steps check nothing, so it is checked before it joins them, and fails alone as its prefill refuses it
    start = tokens(16, 6)
    batcher = Batcher(DECODER, slots=4, max_len=64, block_size=4, prefill_chunk=8)
    first = Request(text(start), max_new_tokens=3)
    batcher.submit(first)
    drain(batcher)
    bad_ids = text(start[:12], torch.tensor([200, 3]))
    bad = Request(bad_ids, max_new_tokens=3)
    batcher.submit(bad)
    drain(batcher)
    assert bad.finish_reason == "error" and isinstance(bad.error, ValueError)
    assert "[0, 97)" in str(bad.error) and "[200]" in str(bad.error)  # the vocabulary and the token, before compute
    assert batcher.cache.hit_tokens == 0 and batcher.cache.pool.in_use == 0


def test_a_held_request_keeps_its_row():
    start = tokens(20, 8)
    writer, shares, later = text(start), text(start[:16], tokens(3, 9)), text(tokens(6, 10))
    # the writer's 20 tokens run in 2 packed chunks, as many steps as the held request's own 16 cached tokens
    batcher = Batcher(DECODER, slots=2, max_len=64, block_size=4, prefill_chunk=10)
    requests = [Request(x, max_new_tokens=30) for x in (writer, shares, later)]
    batcher.submit(*requests)
    batcher.step()
    assert batcher.running == 1 and list(batcher.waiting) == requests[1:]  # a row is free, kept for the held one
    while requests[1] in batcher.waiting:
        batcher.step()
    assert batcher.running == 2 and list(batcher.waiting) == [requests[2]] and batcher.cache.hit_tokens == 16
    drain(batcher)
    for x, request in zip((writer, shares, later), requests):
        assert request.tokens == alone(DECODER, x, request)


@pytest.mark.parametrize("model", [DECODER, PALIGEMMA], ids=["decoder", "paligemma"])
def test_the_group_ends_a_prompt_is_keyed_with_are_those_its_prefill_writes(model):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(6, 90, (9,), generator=g)
    inputs = text(ids) if model is DECODER else image_prompt(torch.randn(3, 32, 32, generator=g), ids[:4], ids[4:])
    keys = prompt_keys(model, inputs)
    cache = PagedCache.for_model(model, 16, 4)
    cache.add(0, keys)
    with torch.no_grad():
        model.prefill(cache=cache.batch([0]), **inputs)
    written = cache.segments.groups[[cache.slot(0, i) for i in range(keys.length)]].tolist()
    assert keys.ends == group_ends(written)
    if model is PALIGEMMA:  # the image and prefix end together; each suffix token is its own group
        assert keys.ends[:N_IMAGE + 4] == [N_IMAGE + 4] * (N_IMAGE + 4)
    with pytest.raises(ValueError, match="one end per token: 9 tokens, 8 ends"):
        PromptKeys({"input_ids": ids}, ends=list(range(1, 9)))
