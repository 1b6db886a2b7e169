"""The statistics of a serving benchmark, as vLLM's `bench serve` reports them (vllm/benchmarks/serve.py): TTFT,
TPOT, ITL and end-to-end latency (mean, median, p99), request and output-token throughput, goodput under stated
SLOs; and the seeded arrival times of a Poisson process at a fixed request rate.

Definitions (vLLM's): TTFT, request sent -> first chunk with text; TPOT, (end - first text) / (output tokens - 1),
a request of one token has none; ITL, the gaps between a request's successive chunks with text, pooled over all
requests (a chunk may carry more than one token, as vLLM's do); end-to-end, request sent -> its last byte;
goodput, requests per second that met every SLO (a one-token request meets any TPOT SLO). Percentiles are
nearest-rank (the value at rank ceil(q/100 * n)), so each is a latency some request really had.
"""

from __future__ import annotations

import gc
import random
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Record:
    """One streamed request as the client saw it, in seconds of the client's clock."""

    sent: float
    done: float
    tokens: int  # output tokens, as the server's usage counts them
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with text
    text: str = ""

    @property
    def ttft(self) -> float:
        return (self.chunks[0] if self.chunks else self.done) - self.sent

    @property
    def e2e(self) -> float:
        return self.done - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.done - self.sent - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


@dataclass(frozen=True)
class Slo:
    """The service-level objectives a request must meet to count in goodput."""

    ttft_ms: float
    tpot_ms: float

    def met(self, record: Record) -> bool:
        tpot = record.tpot
        return record.ttft * 1e3 <= self.ttft_ms and (tpot is None or tpot * 1e3 <= self.tpot_ms)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * q // 100) - 1)]


def summarise(runs: list[list[Record]], slo: Slo) -> dict:
    """vLLM's figures of one or more runs of a load point: latencies in ms (mean, median, p99) over every request,
    throughputs over the runs' wall time (each run's first request sent -> its last answer done, summed), goodput
    under `slo`."""
    records = [r for run in runs for r in run]
    duration = sum(max(r.done for r in run) - min(r.sent for r in run) for run in runs)
    out = {"requests": len(records), "duration_s": duration, "output_tokens": sum(r.tokens for r in records),
           "requests_per_s": len(records) / duration,
           "output_tokens_per_s": sum(r.tokens for r in records) / duration,
           "goodput_requests_per_s": sum(map(slo.met, records)) / duration}
    series = {"ttft": [r.ttft for r in records], "tpot": [r.tpot for r in records if r.tpot is not None],
              "itl": [gap for r in records for gap in r.itl], "e2e": [r.e2e for r in records]}
    for name, values in series.items():
        ms = [1e3 * v for v in values] or [float("nan")]
        out |= {f"{name}_mean_ms": statistics.fmean(ms), f"{name}_median_ms": percentile(ms, 50),
                f"{name}_p99_ms": percentile(ms, 99)}
    return out


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each of n requests is sent: a Poisson process of `rate` requests per
    second (exponential gaps, the first request at 0), the same for the same seed."""
    if n < 1 or rate <= 0:
        raise ValueError(f"arrival_times needs n >= 1 and rate > 0, got n={n}, rate={rate}")
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


@contextmanager
def collector_paused():
    """The client's cyclic garbage collector off while a run is timed (collected just before, back on after): a
    full collection of a process holding torch and the reference's modules takes about 200 ms on the benchmark's
    machine, and it would stop the timestamps of every stream in flight, on whichever server it fell."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
