"""top_k, the repetition / frequency / presence penalties and logprobs on a live server, through the real `openai`
client: a request with them answers what `pm.generate` answers alone with the same settings (greedy and seeded,
chat and completions, streamed or not); the log-probabilities of a greedy answer are those of a forward pass over
its prompt and tokens, its token the most likely; bad values are 400s naming their field. In-process answers run
on one thread, as the server does (OMP_NUM_THREADS=1)."""

import pytest
import torch
from conftest import openai

import polymodal as pm
from polymodal.data.documents import Document, Segment
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import make_collator
from polymodal.generation.prompts import prompts

PROMPT = "two blue squares and"
GREEDY = dict(temperature=0, repetition_penalty=1.4, frequency_penalty=0.8, presence_penalty=0.5)
SEEDED = dict(temperature=0.9, top_k=8, seed=11, repetition_penalty=1.2, presence_penalty=-0.3)


@pytest.fixture(scope="module")
def alone(checkpoint):
    """(text, token ids, the prompt's ids) of `pm.generate` on PROMPT laid out as the server lays it out."""
    model, tokenizer = pm.from_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    collator = make_collator(model.config, tokenizer)

    def run(max_tokens: int, temperature: float, seed: int | None = None, **settings):
        batch, _ = prompts(collator, [Document([Segment("text", PROMPT)])], max_tokens)
        sampled = dict(do_sample=True, temperature=temperature, seed=seed) if temperature > 0 else {}
        tokens = pm.generate(model, **batch, max_new_tokens=max_tokens, eos_token_id=tokenizer.eos_id,
                             pad_token_id=tokenizer.pad_id, **settings, **sampled)[0].tolist()
        tokens = tokens[:tokens.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in tokens else tokens
        return tokenizer.text(tokens), tokens, batch["input_ids"][0]

    run.model = model
    return run


@pytest.mark.parametrize("settings", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_penalties_and_top_k_answer_as_pm_generate_alone(live, alone, settings, one_thread):
    ask = dict(model="gemini-tiny", prompt=PROMPT, max_tokens=16, **settings)
    extra = {k: v for k, v in ask.items() if k == "top_k" or k == "repetition_penalty"}  # not in the openai client
    ask = {k: v for k, v in ask.items() if k not in extra}
    text = live.client.completions.create(**ask, extra_body=extra).choices[0].text
    assert text == alone(16, **settings)[0]
    streamed = live.client.completions.create(**ask, extra_body=extra, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    plain = {k: v for k, v in settings.items() if k in ("temperature", "seed")}
    assert text != alone(16, **plain)[0]  # the settings change this answer: the test would see them ignored


def test_logprobs_of_a_greedy_answer_are_a_forward_pass_and_its_tokens_the_most_likely(live, alone, one_thread):
    ask = dict(model="gemini-tiny", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=5,
               frequency_penalty=0.0)
    whole = live.client.completions.create(**ask).choices[0]
    text, tokens, prompt = alone(10, temperature=0)
    assert whole.text == text
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(tokens)
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 5 and logprob == max(top.values())
    ids = torch.cat([prompt, torch.tensor(tokens)])[None]
    with torch.no_grad():
        expected = alone.model(input_ids=ids).logits[0, -len(tokens) - 1:-1].log_softmax(-1)
    forward = expected.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), forward, atol=1e-4, rtol=0)
    for top, row in zip(lp.top_logprobs, expected.topk(5).values):  # two ids that decode alike share a key
        assert all((row - v).abs().min() < 1e-4 for v in top.values()) and max(top.values()) == pytest.approx(
            float(row[0]), abs=1e-4)
    streamed = list(live.client.completions.create(**ask, stream=True))
    assert sum((c.choices[0].logprobs.token_logprobs for c in streamed if c.choices), []) == lp.token_logprobs
    assert [o for c in streamed if c.choices for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_chat_logprobs_streamed_or_not(live, checkpoint):
    ask = dict(model="gemini-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0,
               logprobs=True, top_logprobs=3)
    whole = live.client.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == entry.top_logprobs[0].logprob == max(t.logprob for t in entry.top_logprobs)
    control = set(Tokenizer.from_file(checkpoint).special_ids)  # <eos> is in the entries, not in the text
    written = b"".join(bytes(e.bytes) for e in content if e.token not in control)  # a random model's: maybe not UTF-8
    assert written.decode(errors="replace") == whole.choices[0].message.content  # whole: test_located_answers
    streamed = list(live.client.chat.completions.create(**ask, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    plain = live.client.chat.completions.create(**{k: v for k, v in ask.items() if "logprobs" not in k})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


@pytest.mark.parametrize("fields, param", [(dict(logprobs=True, top_logprobs=21), "top_logprobs"),
                                           (dict(extra_body={"top_k": -1}), "top_k"),
                                           (dict(presence_penalty=-2.5), "presence_penalty")])
def test_bad_values_are_400s_naming_their_field(live, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        live.client.chat.completions.create(model="gemini-tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2, **fields)
    assert e.value.param == param and param in e.value.message


def test_a_completion_prompt_past_the_context_names_prompt(live):
    with pytest.raises(openai.BadRequestError) as e:
        live.client.completions.create(model="gemini-tiny", prompt="red circle " * 300, max_tokens=4)
    assert e.value.param == "prompt" and e.value.code == "context_length_exceeded"


def test_a_completion_prompt_alone_past_the_context_names_prompt(live):
    """max_tokens not given: the rest of the context is asked for, and a prompt that fills it is the prompt's fault."""
    with pytest.raises(openai.BadRequestError) as e:
        live.client.completions.create(model="gemini-tiny", prompt="~" * 512)  # one token per character
    assert e.value.param == "prompt" and "shorten prompt" in e.value.message


def test_logprobs_are_those_after_the_penalties(live, alone, one_thread):
    """A presence penalty of -2 makes the answer repeat itself: each token's log-probability is the log-softmax of
    the forward pass's logits with OpenAI's presence penalty applied (+2 for each token written before it), and a
    repeated token's differs from the raw one's by far more than the tolerance."""
    ask = dict(model="gemini-tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3, presence_penalty=-2.0)
    whole = live.client.completions.create(**ask).choices[0]
    text, tokens, prompt = alone(12, temperature=0, presence_penalty=-2.0)
    assert whole.text == text
    with torch.no_grad():
        logits = alone.model(input_ids=torch.cat([prompt, torch.tensor(tokens)])[None]).logits[0, -len(tokens) - 1:-1]
    written = torch.zeros(len(tokens), logits.shape[-1])
    for i in range(1, len(tokens)):
        written[i] = written[i - 1]
        written[i, tokens[i - 1]] = 1
    penalised = (logits + 2.0 * written).log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    raw = logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(whole.logprobs.token_logprobs), penalised, atol=1e-4, rtol=0)
    repeated = [i for i in range(len(tokens)) if tokens[i] in tokens[:i]]
    assert repeated and all(penalised[i] - raw[i] > 0.5 for i in repeated), (tokens, penalised - raw)


@pytest.mark.parametrize("completes", [False, True], ids=["held-then-sent", "a-stop-string-reached"])
def test_streamed_logprobs_of_text_held_back_arrive_once_in_order(live, completes):
    """Text that could begin a stop string is held back (no chunk carries it) until it cannot, or the stop string is
    reached: the log-probabilities of its tokens wait with it, and the streamed entries are the whole answer's,
    each once, in order."""
    base = dict(model="gemini-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0,
                logprobs=True, top_logprobs=2)
    text = live.client.chat.completions.create(**base).choices[0].message.content
    assert len(text) >= 8, text
    stop = text[3:7] if completes else text[3:7] + "\x01"  # reached; or followed as far as the text goes, then not
    ask = dict(base, stop=[stop])
    whole = live.client.chat.completions.create(**ask)
    expected = [(e.token, e.logprob, e.bytes) for e in whole.choices[0].logprobs.content]
    assert whole.choices[0].message.content == (text[:3] if completes else text)
    assert len(expected) == whole.usage.completion_tokens
    chunks = [c.choices[0] for c in live.client.chat.completions.create(**ask, stream=True) if c.choices]
    entries = [[(e.token, e.logprob, e.bytes) for e in c.logprobs.content] if c.logprobs else [] for c in chunks]
    assert sum(entries, []) == expected
    assert "".join(c.delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert max(map(len, entries)) > 1  # some chunk carried the entries of tokens held back before it
