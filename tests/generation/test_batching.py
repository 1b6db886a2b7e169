"""Continuous batching: requests that join a running batch at different steps, into reused rows of a small
cache (so spans are moved), each get the tokens `generate` gives them alone, greedy and seeded; a cancelled
request frees its row at the next step; a full queue refuses."""

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.generation.batching import Batcher, QueueFull, Request
from polymodal.families.paligemma.presets import paligemma_tiny

torch.manual_seed(0)
DECODER = pm.build(DecoderConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                 max_seq_len=64)).eval()
PALIGEMMA = pm.build(paligemma_tiny().replace(image_token_id=5)).eval()
EOS = 3


def prompts(model, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(6, 90, (1, int(torch.randint(1, 12, (), generator=g))), generator=g)
        inputs = {"input_ids": ids}
        if model is PALIGEMMA and i % 2 == 0:  # every other prompt with an image: 16 placeholders first
            n_image = PALIGEMMA.config.tokens_per_image
            inputs = {"input_ids": torch.cat([torch.full((1, n_image), 5), ids], 1),
                      "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        out.append(inputs)
    return out


def alone(model, inputs: dict, request: Request) -> list[int]:
    sampled = dict(do_sample=True, temperature=request.temperature, top_p=request.top_p, seed=request.seed)
    tokens = pm.generate(model, **inputs, max_new_tokens=request.max_new_tokens, eos_token_id=EOS,
                         **(sampled if request.temperature > 0 else {}))[0].tolist()
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.mark.parametrize("model", [DECODER, PALIGEMMA], ids=["decoder", "paligemma"])
def test_requests_joining_a_running_batch_get_their_tokens_alone(model):
    batcher = Batcher(model, slots=3, max_len=32 if model is DECODER else 48)
    requests = []
    for i, inputs in enumerate(prompts(model, 9, seed=1)):
        sampled = i % 3 == 2
        requests.append(Request(inputs, max_new_tokens=4 + 3 * i % 17, stop_token_ids=(EOS,),
                                temperature=0.8 if sampled else 0.0, top_p=0.9 if i % 2 else 1.0,
                                seed=i if sampled else None))
    fills = []
    for request in requests:  # one more request every other step
        batcher.submit(request)
        for _ in range(2):
            batcher.step()
            fills.append(batcher.cache.fill.item())
    while not batcher.idle():
        batcher.step()
        fills.append(batcher.cache.fill.item())
    assert any(b < a for a, b in zip(fills, fills[1:])), "the test should make the batcher move the rows' spans"
    for inputs, request in zip(prompts(model, 9, seed=1), requests):
        assert request.tokens == alone(model, inputs, request)
        assert request.finish_reason == ("stop" if request.tokens[-1] == EOS else "length")


def test_requests_in_turn_through_one_slot_whose_spans_move_past_their_old_columns():
    """One slot of 32 columns: each request starts where the last ended, so a move takes a short span from
    the right end to the left, leaving its old columns behind; they must not be seen twice."""
    batcher = Batcher(DECODER, slots=1, max_len=32)
    inputs = prompts(DECODER, 6, seed=4)
    requests = [Request(x, max_new_tokens=12 + 5 * (i % 2)) for i, x in enumerate(inputs)]
    for request in requests:
        batcher.submit(request)
    fills = []
    while not batcher.idle():
        batcher.step()
        fills.append(batcher.cache.fill.item())
    assert any(b < a for a, b in zip(fills, fills[1:]))
    for x, request in zip(inputs, requests):
        assert request.tokens == alone(DECODER, x, request)


def test_a_cancelled_request_frees_its_row_and_a_full_queue_refuses():
    batcher = Batcher(DECODER, slots=1, max_len=64, max_waiting=1)
    [first, second] = prompts(DECODER, 2, seed=2)
    finished = []
    long = Request(first, max_new_tokens=40, on_finish=finished.append)
    batcher.submit(long)
    batcher.step()
    waiting = Request(second, max_new_tokens=5)
    batcher.submit(waiting)
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        batcher.submit(Request(second, max_new_tokens=5))
    batcher.step()
    assert batcher.rows == [long] and len(long.tokens) == 3  # the first step prefilled and decoded
    long.cancelled = True
    batcher.step()
    assert finished == [long] and long.finish_reason == "cancelled" and batcher.rows == [waiting]
    while not batcher.idle():
        batcher.step()
    assert waiting.tokens == alone(DECODER, second, waiting)


def test_a_stopping_listener_and_a_prompt_past_the_cache():
    batcher = Batcher(DECODER, slots=2, max_len=32)
    [inputs] = prompts(DECODER, 1, seed=3)
    seen = []
    request = Request(inputs, max_new_tokens=10, on_token=lambda t: (seen.append(t), len(seen) < 3)[1])
    batcher.submit(request)
    while not batcher.idle():
        batcher.step()
    assert request.tokens == seen == alone(DECODER, inputs, request)[:3] and request.finish_reason == "stop"
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens and max_new_tokens is 40: \d+ in all, past the "
                                         r"batcher's 32 tokens"):
        batcher.submit(Request(inputs, max_new_tokens=40))
