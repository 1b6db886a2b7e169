"""Continuous batching on the paged KV cache: requests that join a running batch at different steps, prefilled
together, each get the tokens `generate` gives them alone, greedy and seeded; a prefix-cache hit (the same image
and prompt prefix) answers as a miss does and another image never hits; chunked prefill after a hit; blocks
follow the live tokens and all come back; admission waits for blocks; a cancelled request leaves at the next
step; a full queue refuses; a chunk boundary anywhere around a media span (its start token, inside it, one
short of its end token, right after it) never splits it, for every family that reads images."""

import gc
import weakref

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.data.documents import Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.generation.prompts import ContextError, prompts as lay_out
from polymodal.presets import get_preset
from polymodal.generation.batching import Batcher, QueueFull, Request
from polymodal.families.flamingo.presets import flamingo_tiny
from polymodal.families.paligemma.presets import paligemma_tiny

torch.manual_seed(0)
DECODER = pm.build(DecoderConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                 max_seq_len=64)).eval()
PALIGEMMA = pm.build(paligemma_tiny().replace(image_token_id=5)).eval()
EOS = 3
N_IMAGE = PALIGEMMA.config.tokens_per_image


def image_prompt(image: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor) -> dict:
    """16 image placeholders and a prefix (bidirectional, token_type_ids 0), then a causal suffix (1)."""
    ids = torch.cat([torch.full((N_IMAGE,), 5), prefix, suffix])[None]
    types = torch.cat([torch.zeros(N_IMAGE + len(prefix), dtype=torch.long), torch.ones(len(suffix), dtype=torch.long)])
    return {"input_ids": ids, "token_type_ids": types[None], "pixel_values": image[None]}


def prompts(model, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(6, 90, (1, int(torch.randint(1, 12, (), generator=g))), generator=g)
        inputs = {"input_ids": ids}
        if model is PALIGEMMA and i % 2 == 0:  # every other prompt with an image
            image = torch.randn(3, 32, 32, generator=g)
            inputs = image_prompt(image, ids[0, :1], ids[0, 1:])
        out.append(inputs)
    return out


def alone(model, inputs: dict, request: Request) -> list[int]:
    sampled = dict(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                   seed=request.seed)
    tokens = pm.generate(model, **inputs, max_new_tokens=request.max_new_tokens, eos_token_id=EOS,
                         repetition_penalty=request.repetition_penalty, frequency_penalty=request.frequency_penalty,
                         presence_penalty=request.presence_penalty,
                         **(sampled if request.temperature > 0 else {}))[0].tolist()
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def held_blocks_follow_live_tokens(batcher: Batcher) -> None:
    """Each live sequence holds ceil(tokens / block size) blocks, and the pool holds nothing else."""
    cache = batcher.cache
    for seq, table in cache.tables.items():
        assert len(table) == -(-cache.lengths[seq] // cache.block_size)
    assert cache.pool.in_use == len({block for table in cache.tables.values() for block in table})


def drain(batcher: Batcher) -> list[int]:
    """Steps until idle, checking the blocks held each step; returns the running count of each step."""
    running = []
    while not batcher.idle():
        batcher.step()
        held_blocks_follow_live_tokens(batcher)
        running.append(batcher.running)
    assert batcher.cache.pool.in_use == 0 and not batcher.cache.tables  # every block came back
    return running


@pytest.mark.parametrize("model", [DECODER, PALIGEMMA], ids=["decoder", "paligemma"])
def test_requests_joining_a_running_batch_get_their_tokens_alone(model):
    batcher = Batcher(model, slots=4, max_len=48, block_size=4)
    n = 10 if model is DECODER else 6
    requests = []
    for i, inputs in enumerate(prompts(model, n, seed=1)):
        sampled = i % 3 == 2
        requests.append(Request(inputs, max_new_tokens=4 + 3 * i % 17, stop_token_ids=(EOS,),
                                temperature=0.8 if sampled else 0.0, top_p=0.9 if i % 2 else 1.0,
                                seed=i if sampled else None))
    for request in requests[:3]:  # three prefilled together, the others join the running batch
        batcher.submit(request)
    for request in requests[3:]:
        batcher.step()
        held_blocks_follow_live_tokens(batcher)
        batcher.submit(request)
    drain(batcher)
    for inputs, request in zip(prompts(model, n, seed=1), requests):
        assert request.tokens == alone(model, inputs, request)
        assert request.finish_reason == ("stop" if request.tokens[-1] == EOS else "length")


def test_penalties_top_k_and_logprobs_per_request_in_one_batch_answer_as_alone():
    """Rows of different settings share decode calls; each keeps its own seen tokens. The log-probabilities of a
    greedy row are those of the forward pass over its prompt and tokens, its token the most likely."""
    settings = [dict(repetition_penalty=1.5), dict(frequency_penalty=1.2, presence_penalty=0.4),
                dict(temperature=0.9, top_k=5, seed=3, repetition_penalty=1.3, presence_penalty=-0.5),
                dict(top_logprobs=4), dict(temperature=1.0, seed=4, top_logprobs=2, frequency_penalty=2.0)]
    batcher = Batcher(DECODER, slots=5, max_len=48, block_size=4)
    inputs = prompts(DECODER, len(settings), seed=8)
    requests = [Request(x, max_new_tokens=12, stop_token_ids=(EOS,), **kw) for x, kw in zip(inputs, settings)]
    for request in requests:
        batcher.submit(request)
    drain(batcher)
    for x, request in zip(inputs, requests):
        assert request.tokens == alone(DECODER, x, request)
        assert len(request.logprobs) == (len(request.tokens) if request.top_logprobs is not None else 0)
    greedy = requests[3]
    ids = torch.cat([inputs[3]["input_ids"][0], torch.tensor(greedy.tokens)])[None]
    expected = DECODER(input_ids=ids).logits[0, -len(greedy.tokens) - 1:-1].log_softmax(-1)
    for (chosen, top), token, row in zip(greedy.logprobs, greedy.tokens, expected):
        assert [i for i, _ in top] == row.topk(4).indices.tolist() and top[0] == (token, chosen)
        torch.testing.assert_close(torch.tensor([chosen, *(v for _, v in top)]),
                                   torch.stack([row[token], *row.topk(4).values]), atol=1e-4, rtol=0)
    assert all(len(top) == 2 for _, top in requests[4].logprobs)
    with pytest.raises(ValueError, match="top_logprobs must be an integer >= 0 and <= 20, got 21"):
        Request(inputs[0], max_new_tokens=2, top_logprobs=21)


def test_a_compiled_packed_step_answers_as_alone_and_compiles_once_for_any_rows_and_lengths():
    """Slow-ish (~13 s of CPU: inductor compiles the packed call's few layouts, its groups of one-token rows and
    of prompt chunks alone or together, a group of one row or of a dynamic number), all in the first run; the
    second run, other prompts and lengths, compiles nothing more."""
    model = pm.build(DECODER.config.replace(n_layers=1)).eval()
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    batcher = Batcher(model, slots=3, max_len=48, block_size=4, compile=True)

    def run(seed: int) -> None:
        inputs = prompts(model, 5, seed=seed)
        requests = [Request(x, max_new_tokens=6 + i, stop_token_ids=(EOS,), temperature=0.7 * (i % 2), seed=i)
                    for i, x in enumerate(inputs)]
        batcher.submit(requests[0])
        batcher.step()  # one row alone, then rows joining and leaving, each of its own length
        for request in requests[1:]:
            batcher.submit(request)
        drain(batcher)
        for x, request in zip(inputs, requests):
            assert request.tokens == alone(model, x, request)

    run(seed=2)
    first = counters["stats"]["unique_graphs"] - before
    run(seed=3)
    assert 0 < first <= 6 and counters["stats"]["unique_graphs"] - before == first


def flamingo(open_gates):
    torch.manual_seed(0)
    config = flamingo_tiny()
    model = pm.build(config.replace(text=config.text.replace(vocab_size=97, dim=32, hidden_dim=64, max_seq_len=64)))
    return open_gates(model).eval()


def test_flamingo_requests_with_any_number_of_images_decode_together_as_alone(open_gates):
    """Each row keeps its own media K/V beside its paged self-attention K/V; rows of 0, 1 and 2 images share
    decode calls."""
    model, g = flamingo(open_gates), torch.Generator().manual_seed(1)
    inputs = []
    for n in (1, 2, 0, 1, 2):
        ids = torch.randint(6, 90, (1, 10), generator=g)
        ids[0, [2, 6][:n]] = model.config.media_token_id
        inputs.append({"input_ids": ids, **({"pixel_values": torch.randn(1, n, 3, 32, 32, generator=g),
                                             "media_mask": torch.ones(1, n, dtype=torch.bool)} if n else {})})
    requests = [Request(x, max_new_tokens=8, stop_token_ids=(EOS,)) for x in inputs]
    batcher = Batcher(model, slots=3, max_len=32, block_size=4)
    for request in requests[:2]:
        batcher.submit(request)
    batcher.step()
    for request in requests[2:]:
        batcher.submit(request)
    drain(batcher)
    assert not batcher.cache.cross and not batcher.cache.media  # every row's media state went with its blocks
    for x, request in zip(inputs, requests):
        assert request.tokens == alone(model, x, request)
    flipped = [alone(model, {**x, "pixel_values": x["pixel_values"].flip(-1)}, r) != r.tokens
               for x, r in zip(inputs, requests) if "pixel_values" in x]
    assert sum(flipped) >= 2  # the images decide the answers


def test_a_prefix_hit_answers_as_a_miss_and_another_image_never_hits():
    g = torch.Generator().manual_seed(5)
    image, prefix = torch.randn(3, 32, 32, generator=g), torch.randint(6, 90, (8,), generator=g)
    other = image.clone()
    other[0, 0, 0] += 1e-3
    suffixes = [torch.randint(6, 90, (n,), generator=g) for n in (5, 9, 6)]
    batcher = Batcher(PALIGEMMA, slots=2, max_len=64, block_size=4, prefill_chunk=3)
    cache, encoder = batcher.cache, batcher.encoder_caches["pixel_values"]
    answers = []
    for picture, suffix, hit in ((image, suffixes[0], 0), (image, suffixes[1], 24), (other, suffixes[2], 0)):
        inputs = image_prompt(picture, prefix, suffix)
        request = Request(inputs, max_new_tokens=6)
        before = cache.hit_tokens
        batcher.submit(request)
        drain(batcher)
        assert cache.hit_tokens - before == hit  # 16 image + 8 prefix tokens: 6 whole blocks of 4 shared
        assert request.tokens == alone(PALIGEMMA, inputs, request)
        answers.append(request)
    assert (encoder.hits, encoder.misses) == (0, 2)  # the hit ran no encoder; the other image was encoded
    # the same image beside another prompt prefix: encoded once more from the encoder cache, no block shared
    request = Request(image_prompt(image, prefix.flip(0), suffixes[0]), max_new_tokens=6)
    before = cache.hit_tokens
    batcher.submit(request)
    drain(batcher)
    assert cache.hit_tokens == before and encoder.hits == 1
    assert request.tokens == alone(PALIGEMMA, image_prompt(image, prefix.flip(0), suffixes[0]), request)


def test_admission_waits_for_blocks_and_a_bad_request_fails_alone():
    batcher = Batcher(DECODER, slots=3, max_len=64, block_size=4, n_blocks=9)  # 8 blocks: one request of 32 tokens
    inputs = prompts(DECODER, 3, seed=6)
    requests = [Request(x, max_new_tokens=20) for x in inputs]
    bad = Request({"input_ids": torch.tensor([[7, 8]]), "pixel_values": torch.zeros(1, 3, 32, 32)}, max_new_tokens=2)
    batcher.submit(bad)
    for request in requests:
        batcher.submit(request)
    assert max(drain(batcher)) == 1  # each waits for the blocks its worst case may take
    assert bad.finish_reason == "error" and "pixel_values" in str(bad.error)
    for x, request in zip(inputs, requests):
        assert request.tokens == alone(DECODER, x, request)
    with pytest.raises(ValueError, match="may take 10 blocks of 4 tokens; the batcher's KV cache has 8"):
        batcher.submit(Request({"input_ids": torch.tensor([[7, 8, 9, 10]])}, max_new_tokens=36))


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
    assert batcher.rows == [long] and len(long.tokens) == 2  # one token per step
    long.cancelled = True
    batcher.step()
    assert finished == [long] and long.finish_reason == "cancelled" and batcher.rows == [waiting]
    assert drain(batcher)
    assert waiting.tokens == alone(DECODER, second, waiting)


def test_a_stopping_listener_and_a_prompt_past_the_cache():
    batcher = Batcher(DECODER, slots=2, max_len=32)
    [inputs] = prompts(DECODER, 1, seed=3)
    seen = []
    request = Request(inputs, max_new_tokens=10, on_token=lambda t: (seen.append(t), len(seen) < 3)[1])
    batcher.submit(request)
    drain(batcher)
    assert request.tokens == seen == alone(DECODER, inputs, request)[:3] and request.finish_reason == "stop"
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens and max_new_tokens is 40: \d+ in all, past the "
                                         r"batcher's 32 tokens"):
        batcher.submit(Request(inputs, max_new_tokens=4), Request(inputs, max_new_tokens=40))
    assert not batcher.waiting  # several requests are queued all or none


def test_a_listener_that_fails_fails_its_request_alone():
    """A request whose token listener raises (the server's, drawing an image) ends as an error with its blocks
    back; the rows decoding beside it go on as alone."""
    batcher = Batcher(DECODER, slots=3, max_len=32, block_size=4)
    inputs = prompts(DECODER, 3, seed=5)

    def breaks(token: int) -> bool:
        raise RuntimeError("the drawing failed")

    requests = [Request(x, max_new_tokens=6, on_token=breaks if i == 1 else None) for i, x in enumerate(inputs)]
    for request in requests:
        batcher.submit(request)
    drain(batcher)
    assert requests[1].finish_reason == "error" and str(requests[1].error) == "the drawing failed"
    assert len(requests[1].tokens) == 1
    for x, request in zip(inputs[::2], requests[::2]):
        assert request.finish_reason == "length" and request.tokens == alone(DECODER, x, request)


def test_a_request_the_model_refuses_fails_alone_in_a_batched_prefill():
    batcher = Batcher(DECODER, slots=3, max_len=32, block_size=4)
    good = prompts(DECODER, 2, seed=7)
    bad = {"input_ids": torch.tensor([[7, 200, 8]])}  # a token past the vocabulary of 97
    requests = [Request(x, max_new_tokens=5) for x in (good[0], bad, good[1])]
    for request in requests:
        batcher.submit(request)
    drain(batcher)
    assert requests[1].finish_reason == "error" and "200" in str(requests[1].error)
    for inputs, request in zip(good, requests[::2]):
        assert request.finish_reason == "length" and request.tokens == alone(DECODER, inputs, request)


def test_a_wave_of_arrivals_is_admitted_over_steps_and_finds_the_first_prefix_cached():
    batcher = Batcher(DECODER, slots=4, max_len=32, block_size=4, prefill_tokens=10)
    inputs = {"input_ids": torch.randint(6, 90, (1, 9), generator=torch.Generator().manual_seed(8))}
    requests = [Request(inputs, max_new_tokens=4) for _ in range(3)]
    for request in requests:
        batcher.submit(request)
    batcher.step()
    assert batcher.running == 1 and len(batcher.waiting) == 2  # 9 prompt tokens of 10 taken
    drain(batcher)
    assert (batcher.cache.hit_tokens, batcher.cache.prompt_tokens) == (2 * 8, 3 * 9)  # two whole blocks each
    assert all(request.tokens == alone(DECODER, inputs, request) for request in requests)


def test_long_prompts_prefill_in_chunks_beside_decode_steps():
    """prefill_chunk=4: a 23-token text prompt runs in chunks of 4 beside a running request's decode steps, in
    the packed steps; a prefix-LM's prompt (with token types, or without: then all of it is one bidirectional
    block) is prefilled whole, then fed its first token. All equal `generate` alone."""
    g = torch.Generator().manual_seed(9)
    text = {"input_ids": torch.randint(6, 90, (1, 23), generator=g)}
    typed = image_prompt(torch.randn(3, 32, 32, generator=g), torch.randint(6, 90, (3,), generator=g),
                         torch.randint(6, 90, (9,), generator=g))
    untyped = {"input_ids": typed["input_ids"], "pixel_values": typed["pixel_values"]}
    for model, inputs, written in ((DECODER, text, 4), (PALIGEMMA, typed, 28 + 1), (PALIGEMMA, untyped, 28 + 1)):
        batcher = Batcher(model, slots=2, max_len=48, block_size=4, prefill_chunk=4)
        running = Request({"input_ids": torch.tensor([[7, 8, 9]])}, max_new_tokens=12)
        batcher.submit(running)
        batcher.step()
        request = Request(inputs, max_new_tokens=5)
        batcher.submit(request)
        batcher.step()
        assert batcher.cache.lengths[batcher.seqs[1].seq] == written  # prefill, then a chunk or its first token
        drain(batcher)
        assert request.tokens == alone(model, inputs, request)
        assert running.tokens == alone(model, running.inputs, running)


def test_an_option_is_not_media_and_reaches_the_prefill():
    """A context error says "media placeholders included" for a prompt with media only, not for one beside an
    option (PaliGemma's interpolate_pos_encoding) or a per-token input. The option reaches the model: a 48 px
    image (36 placeholders) with it answers as `generate` alone beside a 32 px one without it."""
    batcher = Batcher(PALIGEMMA, slots=2, max_len=48, block_size=4)
    ids = torch.full((1, 40), 6)
    for extra, media in (({}, False), ({"interpolate_pos_encoding": True}, False),
                         ({"token_type_ids": torch.ones_like(ids)}, False),
                         ({"pixel_values": torch.zeros(1, 3, 32, 32)}, True)):
        with pytest.raises(ContextError) as e:
            batcher.submit(Request({"input_ids": ids, **extra}, max_new_tokens=20))
        assert e.value.numbers["media"] == media and ("media placeholders" in str(e.value)) == media
    g = torch.Generator().manual_seed(13)
    suffix = torch.randint(6, 90, (4,), generator=g)
    big = {"input_ids": torch.cat([torch.full((36,), 5), suffix])[None], "pixel_values": torch.randn(1, 3, 48, 48, generator=g),
           "interpolate_pos_encoding": True}
    small = image_prompt(torch.randn(3, 32, 32, generator=g), suffix[:1], suffix[1:])
    requests = [Request(x, max_new_tokens=5) for x in (big, small)]
    batcher = Batcher(PALIGEMMA, slots=2, max_len=64, block_size=4)
    batcher.submit(*requests)
    drain(batcher)
    for inputs, request in zip((big, small), requests):
        assert request.error is None and request.tokens == alone(PALIGEMMA, inputs, request)


def test_a_finished_request_lets_its_listeners_go():
    """A listener that refers back to its request (as the server's do) makes no reference cycle once the request
    has finished: it is freed without the garbage collector, whose full passes would pause the batcher."""
    class Listener:
        def __call__(self, token):
            return True

    [inputs] = prompts(DECODER, 1, seed=14)
    listener = Listener()
    request = listener.request = Request(inputs, max_new_tokens=3, on_token=listener, on_finish=lambda r: None)
    batcher = Batcher(DECODER, slots=1, max_len=32)
    gone = weakref.ref(listener)
    gc.disable()
    try:
        batcher.submit(request)
        drain(batcher)
        assert request.on_token is None and request.on_finish is None and len(request.tokens) == 3
        del listener, request
        assert gone() is None
    finally:
        gc.enable()


def laid_out(model, tokenizer, segments: list[Segment]) -> list[int]:
    inputs, _ = lay_out(make_collator(model.config, tokenizer), [Document(segments)], 3)
    inputs.pop("attention_mask")
    return inputs


def image_tokens(ids: list[int], without: list[int]) -> tuple[int, int]:
    """[a, b): the tokens the image put into a prompt (its span, start and end tokens included), read as what
    the prompt without it lacks: the longest common prefix and suffix of the two."""
    a = next(i for i, (x, y) in enumerate(zip(ids, without + [None])) if x != y)
    suffix = next(n for n in range(len(without) - a + 1) if n == len(without) - a or ids[-1 - n] != without[-1 - n])
    return a, len(ids) - suffix


@pytest.mark.parametrize("preset", ["paligemma-tiny", "kosmos-tiny", "gemini-tiny", "chameleon-tiny", "flamingo-tiny"])
def test_a_prompt_chunked_at_any_token_around_its_image_answers_as_alone(preset, open_gates):
    """Text, an image, text, laid out by the family's own format (PaliGemma: its image first), prefilled with a
    first chunk that ends just before the image's tokens, after its start token, inside it, one short of its end
    token, exactly after it and one later: each answers as `generate` alone."""
    world = World(seed=0)
    tokenizer = Tokenizer.train(world.texts(), vocab_size=320)
    torch.manual_seed(0)
    model = pm.build(fit_to_tokenizer(get_preset(preset), tokenizer)).eval()
    model = open_gates(model) if preset.startswith("flamingo") else model
    before = [] if preset.startswith("paligemma") else [Segment("text", "a" * 4)]
    inputs = laid_out(model, tokenizer, [*before, Segment("image", media=world.draw("red", "circle")),
                                         Segment("text", "is it?")])
    ids = inputs["input_ids"][0].tolist()
    a, b = image_tokens(ids, laid_out(model, tokenizer, [*before, Segment("text", "is it?")])["input_ids"][0].tolist())
    assert b - a >= 1 and b < len(ids) - 2  # the image's tokens lie inside the prompt, text after them
    expected = alone(model, inputs, Request(inputs, max_new_tokens=3))
    for chunk in sorted({max(a, 1), a + 1, (a + b) // 2, b - 1, b, b + 1}):
        batcher = Batcher(model, slots=1, max_len=len(ids) + 3, block_size=4, prefill_chunk=chunk)
        request = Request(inputs, max_new_tokens=3)
        batcher.submit(request)
        drain(batcher)
        assert request.error is None and request.tokens == expected, f"prefill_chunk={chunk}, image at {a}..{b - 1}"
