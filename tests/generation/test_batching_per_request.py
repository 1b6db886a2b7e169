"""What the batcher keeps per request while sharing its host work: greedy rows of different settings choose in one
argmax, yet each stops at its own stop tokens (another row's never stops it) and answers as `generate` alone with
them; a request that waits for a prefix over several steps keeps the prompt keys it was first given, and the
batcher lets them go once it leaves the queue."""

import torch

import polymodal as pm
from polymodal.generation.batching import Batcher, Request
from test_batching import DECODER, drain, prompts


def alone(inputs: dict, request: Request) -> list[int]:
    """`generate`'s tokens for the request, up to its first stop token."""
    sampled = dict(do_sample=True, temperature=request.temperature, seed=request.seed) if request.temperature else {}
    out = pm.generate(DECODER, **inputs, max_new_tokens=request.max_new_tokens,
                      eos_token_id=list(request.stop_token_ids) or None, **sampled)[0].tolist()
    stop = next((i for i, t in enumerate(out) if t in request.stop_token_ids), None)
    return out if stop is None else out[:stop + 1]


def test_greedy_rows_of_other_settings_stop_each_at_its_own_tokens():
    prompt = prompts(DECODER, 1, seed=3)[0]
    free = pm.generate(DECODER, **prompt, max_new_tokens=10)[0].tolist()  # the greedy answer, no stop token
    early, late = free[2], next(t for t in free[3:] if t not in free[:3])  # first written at steps 2 and later
    settings = [dict(stop_token_ids=(early,)), dict(stop_token_ids=(late,), top_p=0.5),  # top_p, top_k: unused
                dict(top_k=3, top_logprobs=2), dict(temperature=0.8, seed=5, stop_token_ids=(early,))]
    requests = [Request(prompt, max_new_tokens=10, **kw) for kw in settings]
    batcher = Batcher(DECODER, slots=4, max_len=32, block_size=4)
    batcher.submit(*requests)
    drain(batcher)
    assert requests[0].tokens == free[:3] and requests[0].finish_reason == "stop"
    assert requests[1].tokens == free[:free.index(late) + 1] and requests[1].finish_reason == "stop"
    assert requests[2].tokens == free and requests[2].finish_reason == "length"  # wrote both without stopping
    assert len(requests[2].logprobs) == len(free)
    for request in requests:
        assert request.tokens == alone(prompt, request)


def test_a_held_request_keeps_its_keys_and_the_batcher_drops_them_when_it_leaves_the_queue():
    g = torch.Generator().manual_seed(2)
    start = torch.randint(6, 90, (16,), generator=g)
    writer = {"input_ids": start[None]}  # two packed chunks of 8: the sharer waits for them
    sharer = {"input_ids": torch.cat([start[:12], torch.randint(6, 90, (7,), generator=g)])[None]}
    batcher = Batcher(DECODER, slots=3, max_len=64, block_size=4, prefill_chunk=8)
    first, held = Request(writer, max_new_tokens=4), Request(sharer, max_new_tokens=4)
    batcher.submit(first, held)
    batcher.step()
    assert list(batcher.waiting) == [held]
    keys = batcher.admission[held]
    batcher.step()
    assert list(batcher.waiting) == [held] and batcher.admission[held] is keys  # made once
    batcher.step()
    assert not batcher.waiting and not batcher.admission and batcher.cache.hit_tokens == 12
    drain(batcher)
    for x, request in ((writer, first), (sharer, held)):
        assert request.tokens == alone(x, request)
