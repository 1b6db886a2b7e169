"""Hostile requests to the batcher: each bad one is refused when made or submitted, or fails alone at admission, with
the error `generate` gives it, before the step call that continues every running request (an error there fails them
all) and before anything can raise out of `step` (ending `run`, the server's worker); the requests beside it answer
as `generate` alone, and every block comes back. A prompt may run in that call in part on any model (its rest after
a prefix hit, its chunks past the first), not only a packed text prompt. Also: a failing finish listener fails its
request alone, a cancelled waiting request leaves at once, a long chunked prompt is not starved by later arrivals,
more requests at once than the queue holds are bad input rather than a full queue."""

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.generation.batching import Batcher, Request
from polymodal.generation.prompts import ContextError
from test_batching import DECODER, PALIGEMMA, alone, drain, flamingo, image_prompt
from test_batching_packed import early_fusion

torch.manual_seed(0)
ALIBI = pm.build(DecoderConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                               max_seq_len=64, positions="alibi")).eval()


def refused_rest(which: str, open_gates) -> tuple:
    """(model, a good prompt, a prompt whose tokens past its first 12 include one past the vocabulary, whether the
    bad one shares the good one's first blocks)."""
    g = torch.Generator().manual_seed(5)
    words = lambda n: torch.randint(6, 90, (n,), generator=g)  # noqa: E731
    if which == "paligemma-hit":
        image, prefix = torch.randn(3, 32, 32, generator=g), words(8)
        over = torch.tensor([PALIGEMMA.text_config.vocab_size + 3])
        bad = image_prompt(image, prefix, torch.cat([words(2), over]))
        return PALIGEMMA, image_prompt(image, prefix, words(6)), bad, True
    if which == "gemini-chunked":  # its first chunk ends after its image; the rest runs in the step calls
        model, images, texts = early_fusion("gemini-tiny")
        over = torch.tensor([[model.text_config.vocab_size + 2]])
        bad = {**images[0], "input_ids": torch.cat([images[0]["input_ids"], texts[2]["input_ids"][:, 1:11], over], 1)}
        return model, texts[1], bad, False
    model = {"alibi-hit": ALIBI, "alibi-chunked": ALIBI, "flamingo-hit": flamingo(open_gates)}[which]
    start = words(16)
    if which == "alibi-chunked":
        bad = {"input_ids": torch.cat([start, torch.tensor([200, 4])])[None]}
        return model, {"input_ids": start[None, :5]}, bad, False
    return model, {"input_ids": start[None]}, {"input_ids": torch.cat([start[:12], torch.tensor([200, 4])])[None]}, True


@pytest.mark.parametrize("which", ["alibi-hit", "alibi-chunked", "flamingo-hit", "paligemma-hit", "gemini-chunked"])
def test_a_prompt_refused_past_its_first_tokens_fails_alone(which, open_gates):
    """ALiBi and Flamingo do not pack (their steps are padded calls), PaliGemma and Gemini's image prompts are
    prefilled: none of them is a packed text prompt, yet each may run its rest in the step call. With a repetition
    penalty, its seen tokens, indexed by its ids when it took its row, raised out of `step` (ending `run`)."""
    model, good, bad, hits = refused_rest(which, open_gates)
    batcher = Batcher(model, slots=3, max_len=96, block_size=4, prefill_chunk=8)
    running = Request(good, max_new_tokens=12)
    batcher.submit(running)
    batcher.step()
    batcher.step()  # the good prompt is written: filed at the next admission, where the bad one finds it
    refused = Request(bad, max_new_tokens=3, repetition_penalty=1.3)  # its seen tokens indexed by its ids
    batcher.submit(refused)
    drain(batcher)
    with pytest.raises(ValueError) as alone_error:
        pm.generate(model, **bad, max_new_tokens=3, repetition_penalty=1.3)
    assert refused.finish_reason == "error" and str(refused.error) == str(alone_error.value)
    assert running.error is None and running.tokens == alone(model, good, running)
    assert batcher.cache.hit_tokens == 0  # the refused one took no prefix (and the hit cases would have found one)
    if hits:
        ok = Request({**bad, "input_ids": torch.where(bad["input_ids"] >= model.text_config.vocab_size, 9,
                                                      bad["input_ids"])}, max_new_tokens=3)
        batcher.submit(ok)  # the good prompt's blocks stayed cached
        drain(batcher)
        assert batcher.cache.hit_tokens >= 12 and ok.tokens == alone(model, ok.inputs, ok)


def test_a_request_whose_answer_would_run_past_the_models_context_is_refused_as_generate_refuses_it():
    """A batcher's max_len may be longer than the model's context: a prompt that fits it whose answer would not is
    refused when submitted (it used to run until its sequence passed max_seq_len, failing that step's every row)."""
    g = torch.Generator().manual_seed(6)
    batcher = Batcher(DECODER, slots=2, max_len=96, block_size=4)
    ids = torch.randint(6, 90, (1, 60), generator=g)
    with pytest.raises(ContextError) as alone_error:
        pm.generate(DECODER, input_ids=ids, max_new_tokens=10)
    running = Request({"input_ids": torch.randint(6, 90, (1, 5), generator=g)}, max_new_tokens=12)
    with pytest.raises(ContextError) as refused:
        batcher.submit(running, Request({"input_ids": ids}, max_new_tokens=10))
    assert str(refused.value) == str(alone_error.value)
    fits = Request({"input_ids": ids}, max_new_tokens=4)  # 64 tokens: the model's whole context
    batcher.submit(running, fits)
    drain(batcher)
    for request in (running, fits):
        assert request.error is None and request.tokens == alone(DECODER, request.inputs, request)


@pytest.mark.parametrize("max_new_tokens", [2.5, True, 0])
def test_max_new_tokens_is_checked_as_generate_checks_it(max_new_tokens):
    ids = torch.tensor([[7, 8]])
    with pytest.raises(ValueError) as alone_error:
        pm.generate(DECODER, input_ids=ids, max_new_tokens=max_new_tokens)
    with pytest.raises(ValueError) as refused:
        Request({"input_ids": ids}, max_new_tokens=max_new_tokens)
    assert str(refused.value) == str(alone_error.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_a_prompt_of_ids_that_are_not_integers_is_refused_as_generate_refuses_it(dtype):
    """Its prefill copied them into the batch's integer ids: 7.9 ran as token 7 where `generate` refuses it."""
    ids = torch.tensor([[7.9, 8.2, 9.0]]).to(dtype)
    with pytest.raises(ValueError, match=str(dtype)):
        pm.generate(DECODER, input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=str(dtype)):
        Request({"input_ids": ids}, max_new_tokens=2)


def test_more_requests_at_once_than_the_queue_holds_is_a_bad_request_not_a_full_queue():
    """A full queue (`QueueFull`) is worth a retry; more requests at once than it ever holds are not."""
    batcher = Batcher(DECODER, slots=1, max_len=16, max_waiting=3)
    requests = [Request({"input_ids": torch.tensor([[7, 8]])}, max_new_tokens=2) for _ in range(4)]
    with pytest.raises(ValueError, match="4 requests were submitted at once; the most this batcher queues is 3"):
        batcher.submit(*requests)
    batcher.submit(*requests[:3])
    drain(batcher)
    assert all(r.finish_reason in ("stop", "length") for r in requests[:3])


@pytest.mark.parametrize("ending", ["length", "cancelled", "cancelled waiting"])
def test_a_finish_listener_that_fails_fails_its_request_alone(ending):
    """As a token listener that fails: the requests beside it answer as alone, and `step` goes on (a failure out of a
    step boundary ended `run`, the server's worker)."""
    def breaks(request):
        raise RuntimeError("the listener broke")

    batcher = Batcher(DECODER, slots=2, max_len=64, block_size=4)
    others = [Request({"input_ids": torch.tensor([[7, 8, 9 + i]])}, max_new_tokens=10)
              for i in range(2 if ending == "cancelled waiting" else 1)]  # two: it waits for a row
    broken = Request({"input_ids": torch.tensor([[11, 12]])}, max_new_tokens=2, on_finish=breaks)
    batcher.submit(*others, broken)
    batcher.step()
    broken.cancelled = ending != "length"
    drain(batcher)
    assert broken.finish_reason == "error" and str(broken.error) == "the listener broke"
    assert batcher.finished["error"] == 1
    for request in others:
        assert request.error is None and request.tokens == alone(DECODER, request.inputs, request)


def test_a_prompt_given_with_its_attention_mask_answers_as_generate_and_a_padded_one_is_refused():
    """`generate`'s inputs (`generation.prompts.prompts` gives an attention_mask) reached the prefill with a second
    attention_mask: a TypeError naming Python's keyword arguments, where `generate` answers."""
    ids = torch.tensor([[7, 8, 9, 10]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batcher = Batcher(DECODER, slots=2, max_len=64, block_size=4)
    request = Request(inputs, max_new_tokens=5)
    batcher.submit(request)
    drain(batcher)
    assert request.error is None and request.tokens == pm.generate(DECODER, **inputs, max_new_tokens=5)[0].tolist()
    with pytest.raises(ValueError, match="no padding: its attention_mask must be ones of shape"):
        Request({"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1]])}, max_new_tokens=5)


def test_a_long_prompt_in_chunks_is_not_starved_by_later_arrivals_in_lower_rows():
    """The step's prompt-token budget went to the rows in row order: short prompts arriving one after another into
    row 0 (freed each step) took it every step, and a 20-token prompt admitted before them into row 2 waited for
    their end (34 steps here). Given in order of admission, it runs its 5 chunks first."""
    g = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(6, 90, (1, n), generator=g)  # noqa: E731
    batcher = Batcher(DECODER, slots=3, max_len=64, block_size=4, prefill_chunk=4, prefill_tokens=4)
    early = [Request({"input_ids": words(2)}, max_new_tokens=n) for n in (2, 60)]
    batcher.submit(*early)
    batcher.step()
    long = Request({"input_ids": words(20)}, max_new_tokens=2)
    batcher.submit(long)
    arrivals = []
    for _ in range(6):
        if not batcher.waiting and None in batcher.rows:
            arrivals.append(Request({"input_ids": words(12)}, max_new_tokens=1))
            batcher.submit(arrivals[-1])
        batcher.step()
    assert arrivals and long.tokens  # its 5 chunks ran in the 5 steps after it was admitted, before theirs
    drain(batcher)
    for request in [*early, long, *arrivals]:
        assert request.tokens == alone(DECODER, request.inputs, request)


def test_a_text_prompt_whose_rest_holds_an_image_placeholder_fails_alone_as_generate_refuses_it():
    """PaliGemma's text prompts are not packed (their token types are per-token inputs), so `check_prompt` was not
    run: after a hit on the prefix and the first suffix tokens, the rest, an image placeholder with no image among
    it, ran in the step call and answered where `generate` refuses it."""
    g = torch.Generator().manual_seed(7)
    prefix, suffix = torch.randint(6, 90, (8,), generator=g), torch.randint(6, 90, (14,), generator=g)

    def text(suffix: torch.Tensor) -> dict:
        types = torch.cat([torch.zeros(len(prefix), dtype=torch.long), torch.ones(len(suffix), dtype=torch.long)])
        return {"input_ids": torch.cat([prefix, suffix])[None], "token_type_ids": types[None]}

    image_token = PALIGEMMA.config.image_token_id
    good, bad = text(suffix), text(torch.cat([suffix[:10], torch.tensor([image_token, 7])]))
    with pytest.raises(ValueError) as alone_error:
        pm.generate(PALIGEMMA, **bad, max_new_tokens=3)
    batcher = Batcher(PALIGEMMA, slots=2, max_len=64, block_size=4)
    running = Request(good, max_new_tokens=12)
    batcher.submit(running)
    batcher.step()
    batcher.step()  # filed at the next admission: the bad one's first 16 tokens would hit
    refused = Request(bad, max_new_tokens=3)
    batcher.submit(refused)
    drain(batcher)
    assert refused.finish_reason == "error" and str(refused.error) == str(alone_error.value)
    assert running.error is None and running.tokens == alone(PALIGEMMA, good, running)


def test_a_cancelled_waiting_request_leaves_the_queue_at_the_next_step_while_every_row_is_busy():
    """It stayed queued until a row freed: its client was told nothing, and the queue it filled answered the next
    client 429."""
    batcher = Batcher(DECODER, slots=1, max_len=64, max_waiting=1)
    running = Request({"input_ids": torch.tensor([[7, 8, 9]])}, max_new_tokens=30)
    gone = Request({"input_ids": torch.tensor([[10, 11]])}, max_new_tokens=3)
    batcher.submit(running)
    batcher.step()
    batcher.submit(gone)
    batcher.step()
    gone.cancelled = True
    batcher.step()
    assert gone.finish_reason == "cancelled" and not batcher.waiting and batcher.running == 1
    later = Request({"input_ids": torch.tensor([[12, 13]])}, max_new_tokens=3)
    batcher.submit(later)  # the queue has room
    drain(batcher)
    for request in (running, later):
        assert request.tokens == alone(DECODER, request.inputs, request)


@pytest.mark.parametrize("stop", [["3"], [200], [-1], [3, 4]])
def test_stop_token_ids_are_checked_as_generate_checks_them_and_a_list_is_taken(stop):
    """A list (unhashable: the chooser's key) or a string raised out of `step` (ending `run`, the server's worker) after
    the request had taken its row; ids past the vocabulary, which `generate` refuses, were taken."""
    ids = torch.tensor([[11, 12]])
    batcher = Batcher(DECODER, slots=2, max_len=64)
    running = Request({"input_ids": torch.tensor([[7, 8, 9]])}, max_new_tokens=5)
    batcher.submit(running)
    if stop == [3, 4]:
        request = Request({"input_ids": ids}, max_new_tokens=6, stop_token_ids=stop)
        batcher.submit(request)
        drain(batcher)
        tokens = pm.generate(DECODER, input_ids=ids, max_new_tokens=6, eos_token_id=stop)[0].tolist()
        assert request.tokens == tokens[:next((i + 1 for i, t in enumerate(tokens) if t in stop), len(tokens))]
    else:
        with pytest.raises(ValueError) as alone_error:
            pm.generate(DECODER, input_ids=ids, max_new_tokens=3, eos_token_id=stop)
        with pytest.raises(ValueError) as refused:
            batcher.submit(Request({"input_ids": ids}, max_new_tokens=3, stop_token_ids=stop))
        assert str(refused.value) == str(alone_error.value).replace("eos_token_id", "stop_token_ids")
        drain(batcher)
    assert running.tokens == alone(DECODER, running.inputs, running)
