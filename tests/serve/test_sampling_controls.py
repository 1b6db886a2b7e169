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


def test_chat_logprobs_streamed_or_not(live):
    ask = dict(model="gemini-tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0,
               logprobs=True, top_logprobs=3)
    whole = live.client.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == entry.top_logprobs[0].logprob == max(t.logprob for t in entry.top_logprobs)
        assert bytes(entry.bytes).decode() == entry.token
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
