"""`/metrics` on a live server, read by Prometheus' own text parser: requests by path and status, prompt and
completion tokens (as the answers' usage says), request latency and time-to-first-token histograms and the queue gauges, each moved by
exactly the requests made between two scrapes; and one log line per request."""

import urllib.request

import pytest
from conftest import call
from test_bad_requests import chat

parser = pytest.importorskip("prometheus_client.parser")


def scrape(live) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(live.url + "/metrics", timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_the_requests_made_between_two_scrapes(live):
    before = scrape(live)
    answers = [call(live.url + "/v1/chat/completions", chat(max_tokens=3))[1] for _ in range(3)]
    assert call(live.url + "/v1/chat/completions", chat(n=0))[0] == 400
    assert call(live.url + "/v1/nowhere/at/all")[0] == 404
    after = scrape(live)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    chat_path = "/v1/chat/completions"
    assert moved("polymodal_requests_total", path=chat_path, status="200") == 3
    assert moved("polymodal_requests_total", path=chat_path, status="400") == 1
    assert moved("polymodal_requests_total", path="other", status="404") == 1
    assert moved("polymodal_prompt_tokens_total") == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert moved("polymodal_completion_tokens_total") == sum(a["usage"]["completion_tokens"] for a in answers) > 0
    assert moved("polymodal_request_duration_seconds_count", path=chat_path) == 4
    assert moved("polymodal_request_duration_seconds_bucket", path=chat_path, le="+Inf") == 4
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                     if k[0] == "polymodal_request_duration_seconds_bucket" and dict(k[1])["path"] == chat_path)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert moved("polymodal_request_duration_seconds_sum", path=chat_path) > 0
    answered = sum(a["choices"][0]["message"]["content"] != "" for a in answers)  # a first token was written
    assert moved("polymodal_time_to_first_token_seconds_count") == answered
    assert 0 < moved("polymodal_time_to_first_token_seconds_sum") <= moved("polymodal_request_duration_seconds_sum",
                                                                           path=chat_path) or answered == 0
    assert after[("polymodal_queue_depth", ())] == 0 and after[("polymodal_running_requests", ())] == 0
    assert after[("polymodal_worker_alive", ())] == 1
    assert not any(dict(k[1]).get("path") in ("/metrics", "/health") for k in after)
