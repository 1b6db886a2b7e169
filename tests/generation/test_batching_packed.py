"""The batcher's packed step: a step where text requests arrive beside running rows and long prompts run in chunks
makes one model call (counted by a hook on the model), its prompt tokens within `prefill_tokens`; a mix of
decode rows, arrivals, chunked prompts, prefix hits and image requests answers as `generate` alone for a text
decoder, a causal early-fusion model (its text prompts packed, its image ones prefilled), PaliGemma (prefilled,
then packed) and Flamingo (padded calls: its cross-attention reads rows)."""

import pytest
import torch

import polymodal as pm
from polymodal.data.documents import Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer
from polymodal.generation.batching import Batcher, Request
from polymodal.presets import get_preset
from test_batching import DECODER, EOS, PALIGEMMA, alone, drain, flamingo, image_prompt, laid_out, prompts


def calls_of(model) -> list[int]:
    """The tokens of each call the model runs from now on (a forward hook: the real calls, counted)."""
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].numel()),
                                with_kwargs=True)
    return calls


def test_a_step_with_text_arrivals_and_chunks_makes_one_call_within_the_token_budget():
    model = pm.build(DECODER.config).eval()
    model.load_state_dict(DECODER.state_dict())
    calls = calls_of(model)
    batcher = Batcher(model, slots=5, max_len=64, block_size=4, prefill_chunk=8, prefill_tokens=12)
    g = torch.Generator().manual_seed(21)
    running = [Request({"input_ids": torch.tensor([ids])}, max_new_tokens=24) for ids in ([7, 8, 9], [10, 11])]
    arrivals = [Request({"input_ids": torch.randint(6, 90, (1, n), generator=g)}, max_new_tokens=5)
                for n in (30, 5, 11)]
    batcher.submit(*running)
    per_step = []
    for step in range(14):
        if step in (1, 2, 3):
            batcher.submit(arrivals[step - 1])
        before = len(calls)
        batcher.step()
        per_step.append(calls[before:])
        assert len(calls) - before == 1  # one call, whatever arrived
        assert calls[-1] <= batcher.slots + 12  # the rows' decode tokens, and 12 prompt tokens at most
    assert per_step[1] == [2 + 8]  # two decode rows and the 30-token prompt's first chunk of 8
    assert per_step[2] == [2 + 8 + 4]  # then its second chunk and 4 of the 5-token prompt's: 12 prompt tokens
    drain(batcher)
    for r in [*running, *arrivals]:
        assert r.tokens == alone(model, r.inputs, r)


def early_fusion(preset: str) -> tuple:
    """The model, two image prompts and four text prompts laid out by its own format and tokenizer."""
    world = World(seed=0)
    tokenizer = Tokenizer.train(world.texts(), vocab_size=320)
    torch.manual_seed(0)
    model = pm.build(fit_to_tokenizer(get_preset(preset), tokenizer)).eval()
    images = [laid_out(model, tokenizer, [Segment("text", "see"), Segment("image", media=world.draw(colour, shape)),
                                          Segment("text", "is it?")])
              for colour, shape in (("red", "circle"), ("blue", "square"))]
    texts = [laid_out(model, tokenizer, [Segment("text", text)])
             for text in ("a red", "the blue circle", "a green square left of a red circle above", "two")]
    return model, images, texts


def random_texts(g: torch.Generator) -> list[dict]:
    return [{"input_ids": torch.randint(6, 90, (1, n), generator=g)} for n in (3, 9, 26, 5)]


@pytest.mark.parametrize("which", ["decoder", "gemini", "paligemma", "flamingo"])
def test_a_mix_of_arrivals_chunks_prefix_hits_and_images_answers_as_alone(which, open_gates):
    """Short text prompts, a long one twice (the second arrives once the first is written, and hits its blocks),
    image prompts between; prefill_chunk=6 cuts the long ones beside the decode rows."""
    g = torch.Generator().manual_seed(23)
    if which == "decoder":
        model, images, texts = DECODER, prompts(DECODER, 2, seed=24), random_texts(g)
    elif which == "gemini":
        model, images, texts = early_fusion("gemini-tiny")
    elif which == "paligemma":
        model, texts = PALIGEMMA, random_texts(g)
        images = [image_prompt(torch.randn(3, 32, 32, generator=g), torch.tensor([7, 8]), torch.tensor([9, 10, 11]))
                  for _ in range(2)]
    else:
        model, texts = flamingo(open_gates), random_texts(g)
        ids = torch.randint(6, 90, (1, 9), generator=g)
        ids[0, 2] = model.config.media_token_id
        images = [{"input_ids": ids, "pixel_values": torch.randn(1, 1, 3, 32, 32, generator=g),
                   "media_mask": torch.ones(1, 1, dtype=torch.bool)}]
    assert model.packs == (which != "flamingo")
    long = texts[2]["input_ids"].shape[1]
    assert long > 12
    inputs = [texts[0], images[0], texts[1], texts[2], *images[1:], texts[3], {"input_ids": texts[2]["input_ids"]}]
    batcher = Batcher(model, slots=4, max_len=64, block_size=4, prefill_chunk=6, prefill_tokens=16)
    requests = [Request(x, max_new_tokens=5 + i % 4, stop_token_ids=(EOS,)) for i, x in enumerate(inputs)]
    batcher.submit(*requests[:2])
    for request in requests[2:]:
        for _ in range(2 if request.inputs is not inputs[-1] else long // 6 + 1):
            batcher.step()
        batcher.submit(request)
    drain(batcher)
    for x, request in zip(inputs, requests):
        assert request.error is None and request.tokens == alone(model, x, request)
    if which == "gemini":  # a text prompt its prefill refuses (an image span backwards, no image) fails alone
        ids = images[0]["input_ids"].flip(1)
        bad, good = Request({"input_ids": ids}, max_new_tokens=3), Request(texts[1], max_new_tokens=3)
        batcher.submit(bad, good)
        drain(batcher)
        with pytest.raises(ValueError) as refused:
            pm.generate(model, input_ids=ids, max_new_tokens=3)
        assert bad.finish_reason == "error" and str(bad.error) == str(refused.value)
        assert good.tokens == alone(model, texts[1], good)
    if which != "paligemma":  # (a prefix-LM's text without token types is one bidirectional block: no prefix)
        assert batcher.cache.hit_tokens >= (long - 1) // 4 * 4 - 4  # the long prompt's copy found its blocks


def test_a_refused_text_prompt_is_never_held_for_a_prefix_an_image_prompt_writes():
    """A gemini image prompt is prefilled in the step it is admitted, before the packed call; a text prompt sharing
    its first 12 tokens, then a token past the vocabulary, must not wait for that prefix and start on it (its rest
    would run unchecked in the packed call): it is refused and fails alone, and the image prompt answers as alone."""
    world = World(seed=0)
    tokenizer = Tokenizer.train(world.texts(), vocab_size=320)
    torch.manual_seed(0)
    model = pm.build(fit_to_tokenizer(get_preset("gemini-tiny"), tokenizer)).eval()
    text = "a green square left of a red circle above a blue square right of a red circle"
    writer = laid_out(model, tokenizer, [Segment("text", text), Segment("image", media=world.draw("red", "circle")),
                                         Segment("text", "is it?")])
    model.check_prompt(writer["input_ids"][:, :12])  # its first 12 tokens are text (no image span opened)
    vocab = model.text_config.vocab_size
    bad_ids = torch.cat([writer["input_ids"][:, :12], torch.tensor([[vocab + 5]])], 1)
    batcher = Batcher(model, slots=4, max_len=256, block_size=4)
    first, bad = Request(writer, max_new_tokens=4), Request({"input_ids": bad_ids}, max_new_tokens=4)
    batcher.submit(first, bad)
    drain(batcher)
    assert bad.finish_reason == "error" and bad.tokens == [] and str(vocab) in str(bad.error)
    assert first.error is None and first.tokens == alone(model, writer, first)


def test_a_text_prompt_past_the_models_context_fails_alone():
    """A batcher may be given a longer max_len than the model's context: a packed prompt past max_seq_len is refused
    when submitted, as `generate` refuses it, and the request running beside it answers as alone."""
    g = torch.Generator().manual_seed(31)
    batcher = Batcher(DECODER, slots=2, max_len=96, block_size=4, prefill_chunk=16)
    running = Request({"input_ids": torch.randint(6, 90, (1, 5), generator=g)}, max_new_tokens=12)
    long = Request({"input_ids": torch.randint(6, 90, (1, DECODER.config.max_seq_len + 1), generator=g)},
                   max_new_tokens=2)
    batcher.submit(running)
    batcher.step()
    with pytest.raises(ValueError, match="past the model's context of 64 tokens"):
        batcher.submit(long)
    drain(batcher)
    assert running.error is None and running.tokens == alone(DECODER, running.inputs, running)
