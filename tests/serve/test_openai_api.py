"""The OpenAI API of `polymodal serve`, through the real `openai` client on a live server: a chat with an image
answers what `polymodal generate` answers, streamed or not; n > 1, seeds, stop strings, /v1/completions; the
server's log line per request."""

import re
import subprocess
import sys
import time

from conftest import ENV, WORLD, call, image_message

from polymodal.data.documents import wav_bytes

QUESTION = "what colour is the shape?"
AUDIO = WORLD.sample("audio_count", 0).document.audios[0]


def generate(checkpoint, tmp_path, *flags) -> str:
    out = subprocess.run([sys.executable, "-m", "polymodal.cli", "generate", str(checkpoint), "--prompt", QUESTION,
                          *map(str, flags)], capture_output=True, text=True, env=ENV, timeout=300, check=True)
    return out.stdout.strip()


def test_chat_with_an_image_and_audio_answers_as_polymodal_generate_streamed_or_not(live, checkpoint, tmp_path):
    messages = image_message(WORLD.draw("red", "circle"), QUESTION, audio=AUDIO)
    whole = live.client.chat.completions.create(model="gemini-tiny", messages=messages, temperature=0, max_tokens=12)
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    answer = choice.message.content
    WORLD.draw("red", "circle").save(tmp_path / "red.png")
    (tmp_path / "beeps.wav").write_bytes(wav_bytes(AUDIO))
    expected = generate(checkpoint, tmp_path, "--image", tmp_path / "red.png", "--audio", tmp_path / "beeps.wav",
                        "--max-new-tokens", 12)
    assert answer.strip() == expected != ""
    media = 16 + 25  # gemini-tiny: 16 image patches and 25 audio tokens, one placeholder each
    assert whole.usage.prompt_tokens > media and whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(live.client.chat.completions.create(model="gemini-tiny", messages=messages, temperature=0,
                                                      max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_n_choices_and_seeds(live, checkpoint, tmp_path):
    messages = image_message(WORLD.draw("blue", "square"), QUESTION)
    ask = dict(model="gemini-tiny", messages=messages, temperature=1.0, top_p=0.9, max_tokens=10, n=3)
    first = live.client.chat.completions.create(seed=7, **ask)
    again = live.client.chat.completions.create(seed=7, **ask)
    other = live.client.chat.completions.create(seed=8, **ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # a seed reproduces every choice
    assert len(set(texts)) > 1 and texts != [c.message.content for c in other.choices]
    # choice i samples with seed + i, as `polymodal generate --seed` does alone
    WORLD.draw("blue", "square").save(tmp_path / "blue.png")
    assert texts[1].strip() == generate(checkpoint, tmp_path, "--image", tmp_path / "blue.png", "--do-sample",
                                        "--temperature", "1.0", "--top-p", "0.9", "--seed", 8, "--max-new-tokens", 10)


def test_stop_strings_end_the_answer_before_them(live):
    ask = dict(model="gemini-tiny", messages=image_message(WORLD.draw("green", "triangle"), QUESTION),
               temperature=1.0, seed=3, max_tokens=24)
    full = live.client.chat.completions.create(**ask).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(full) > 6 and len(stop) == 2, full
    expected = full[:full.index(stop)]
    cut = live.client.chat.completions.create(stop=[stop, "never appears"], **ask).choices[0]
    assert (cut.message.content, cut.finish_reason) == (expected, "stop")
    streamed = live.client.chat.completions.create(stop=stop, stream=True, **ask)
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_completions_of_several_prompts(live):
    out = live.client.completions.create(model="gemini-tiny", prompt=["a red circle", "two blue squares"],
                                         max_tokens=6, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: both choices of a prompt agree
    alone = live.client.completions.create(model="gemini-tiny", prompt="two blue squares", max_tokens=6,
                                           temperature=0)
    assert alone.choices[0].text == texts[2]
    assert [m.id for m in live.client.models.list().data] == ["gemini-tiny"]
    health = live.health()
    assert (health["model"], health["slots"], health["running"], health["waiting"]) == ("gemini-tiny", 8, 0, 0)


def test_the_server_logs_one_line_per_request(live):
    """Status, tokens and latency of each request, streamed or not, errors too; health polls are not logged."""
    def settled() -> int:  # a line is written once its answer has gone out: wait for the last one
        n = -1
        while n != len(live.log):
            n = len(live.log)
            time.sleep(0.3)
        return n

    def lines_after(action):
        before = settled()
        action()
        return [line.rstrip("\n") for line in live.log[before:settled()]]

    whole = lines_after(lambda: live.client.completions.create(model="gemini-tiny", prompt="a red circle",
                                                                max_tokens=5, temperature=0))
    [line] = whole
    usage = re.fullmatch(r"POST /v1/completions 200 \| (\d+) prompt \+ (\d+) completion tokens \| (\d+) ms", line)
    assert usage and int(usage[1]) > 0 and 1 <= int(usage[2]) <= 5, line

    def streamed():
        for _ in live.client.chat.completions.create(model="gemini-tiny", max_tokens=4, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": "a red circle"}]):
            pass

    [line] = lines_after(streamed)
    assert re.fullmatch(r"POST /v1/chat/completions 200 \| \d+ prompt \+ [1-4] completion tokens \| \d+ ms", line)
    [line] = lines_after(lambda: call(live.url + "/v1/completions", b"{not json"))
    assert re.fullmatch(r"POST /v1/completions 400 \| \d+ ms", line), line
    assert lines_after(live.health) == []
