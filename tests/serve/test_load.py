"""Load on a live server (8 slots): 64 concurrent requests mixing images and text, streaming or not, greedy
or seeded sampling, each answered exactly as it is alone (no cross-talk between rows); then the server's
memory stays flat over 1,000 more requests."""

from concurrent.futures import ThreadPoolExecutor

from conftest import WORLD, image_message

from polymodal.data.synthetic import OBJECTS

PROMPTS = [image_message(WORLD.draw(*o.split()), "what colour is the shape?") for o in OBJECTS[:8]] + [
    [{"role": "user", "content": f"draw {o}" + " please" * i}] for i, o in enumerate(OBJECTS[:8])]


def ask(live, i: int, sampled: bool, stream: bool) -> tuple[str, str]:
    settings = dict(temperature=0.9, top_p=0.95, seed=100 + i) if sampled else dict(temperature=0)
    out = live.client.chat.completions.create(model="gemini-tiny", messages=PROMPTS[i], max_tokens=6 + i % 7,
                                              stream=stream, **settings)
    if not stream:
        return out.choices[0].message.content, out.choices[0].finish_reason
    chunks = [c.choices[0] for c in out if c.choices]
    return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason


def test_64_concurrent_mixed_requests_answer_as_alone_and_memory_stays_flat(live):
    jobs = [(i, sampled, stream) for i in range(len(PROMPTS)) for sampled in (False, True) for stream in (False, True)]
    alone = {(i, sampled): ask(live, i, sampled, stream=False) for i, sampled, stream in jobs if not stream}
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(live, *job), jobs))
    assert len(jobs) == 64
    for (i, sampled, _), answer in zip(jobs, together):
        assert answer == alone[i, sampled], (i, sampled)
    assert len({a for a, _ in alone.values()}) > len(PROMPTS)  # the answers differ: a mix-up would show

    def small(k: int) -> None:
        ask_small = dict(model="gemini-tiny", messages=PROMPTS[k % len(PROMPTS)], max_tokens=2, temperature=k % 2,
                         stream=k % 3 == 0)
        out = live.client.chat.completions.create(**ask_small)
        if ask_small["stream"]:
            list(out)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(small, range(200)))  # warm: every code path and buffer has been used
        before = live.rss_kib()
        list(pool.map(small, range(200, 1000)))
    after = live.rss_kib()
    assert after - before < 16 * 1024, f"the server grew from {before} KiB to {after} KiB over 800 requests"
    health = live.health()
    assert health["running"] == health["waiting"] == 0
