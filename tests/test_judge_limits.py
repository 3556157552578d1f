"""The LLM judge's requests/tokens-per-minute limiter (stages/judges/limits.py): the sliding
window on a fake clock, its waiting, and the limits holding for four Ray judge actors together
against the fake judge server (one shared limiter actor, pipeline/shared_limits.py)."""
from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest

from devkit.fake_judge_server import FakeJudgeServer
from stages.judges import limits
from stages.judges.limits import SlidingWindowLimiter, estimate_prompt_tokens, estimate_tokens, limiter_settings
from stages.record import dumps

# --- the window on a fake clock ------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_request_counts_while_in_flight_and_for_a_window_after_it_ended():
    clock = Clock()
    lim = SlidingWindowLimiter(requests=2, window_s=10, hold_s=100, clock=clock)
    a, _ = lim.reserve(1)
    b, _ = lim.reserve(1)
    ticket, wait = lim.reserve(1)
    assert a and b and ticket is None and wait == pytest.approx(110)  # in flight: only a settle frees room
    clock.now = 3.0
    lim.settle(a)
    clock.now = 50.0
    lim.settle(a)  # a second settle keeps the first end
    clock.now = 12.9
    assert lim.reserve(1) == (None, pytest.approx(0.1))
    clock.now = 13.0  # a ended at 3: from 13 on it is out of every window that holds now
    ticket, _ = lim.reserve(1)
    assert ticket is not None and lim.used() == (2, 2.0)


def test_tokens_are_estimated_then_replaced_by_the_reported_usage():
    clock = Clock()
    lim = SlidingWindowLimiter(tokens=100, window_s=10, clock=clock)
    first, _ = lim.reserve(60)
    assert lim.reserve(60)[0] is None
    lim.settle(first, tokens=30)  # the reply used less than its estimate
    second, _ = lim.reserve(60)
    assert second is not None and lim.used() == (2, 90.0)
    lim.settle(second, tokens=80)  # or more
    assert lim.reserve(1)[0] is None


def test_an_oversized_request_waits_for_an_empty_window():
    clock = Clock()
    lim = SlidingWindowLimiter(requests=5, tokens=100, window_s=10, clock=clock)
    small, _ = lim.reserve(10)
    assert lim.reserve(150)[0] is None
    lim.settle(small)
    clock.now = 10.0
    big, _ = lim.reserve(150)
    assert big is not None and lim.reserve(1)[0] is None


def test_an_entry_never_settled_is_released_after_hold_s():
    clock = Clock()
    lim = SlidingWindowLimiter(requests=1, window_s=10, hold_s=30, clock=clock)
    lim.reserve(1)  # its worker died: no settle
    clock.now = 39.9
    assert lim.reserve(1)[0] is None
    clock.now = 40.0
    assert lim.reserve(1)[0] is not None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_server_never_sees_more_than_the_limits_in_any_window(seed):
    """Simulated clients with random latencies: each request reaches the server at a random moment
    between its admission and its end; every window of the server's log stays within the limits."""
    rng = random.Random(seed)
    clock = Clock()
    window, max_requests, max_tokens = 5.0, 8, 4000
    lim = SlidingWindowLimiter(requests=max_requests, tokens=max_tokens, window_s=window, clock=clock)
    pending = [rng.randint(100, 900) for _ in range(400)]  # estimates; usage is lower
    in_flight: list[tuple[float, int, int]] = []  # (end, ticket, usage)
    server: list[tuple[float, int]] = []  # (received, usage)
    while pending or in_flight:
        in_flight.sort()
        while in_flight and in_flight[0][0] <= clock.now:
            _, ticket, usage = in_flight.pop(0)
            lim.settle(ticket, tokens=usage)
        wait = None
        while pending:
            ticket, wait = lim.reserve(pending[0])
            if ticket is None:
                break
            estimate = pending.pop(0)
            usage = rng.randint(estimate // 2, estimate)
            latency = rng.choice([0.01, 0.5, 3.0, rng.uniform(0, 8)])
            server.append((clock.now + rng.uniform(0, latency), usage))
            in_flight.append((clock.now + latency, ticket, usage))
        steps = ([in_flight[0][0]] if in_flight else []) + ([clock.now + wait] if wait is not None else [])
        if steps:
            clock.now = max(min(steps), clock.now + 1e-9)
    server.sort()
    peak_requests = peak_tokens = 0
    for i, (start, _) in enumerate(server):
        inside = [u for t, u in server[i:] if t < start + window]
        peak_requests, peak_tokens = max(peak_requests, len(inside)), max(peak_tokens, sum(inside))
    assert len(server) == 400
    assert peak_requests <= max_requests and peak_tokens <= max_tokens
    assert peak_requests >= max_requests - 2  # and the limiter is not needlessly strict


# --- waiting ---------------------------------------------------------------------------------------

def test_waiters_are_served_in_order_and_woken_by_a_settle():
    async def go():
        lim = SlidingWindowLimiter(requests=1, window_s=0.2, hold_s=0.5)
        first = await lim.acquire(1)
        order = []

        async def waiter(name):
            await lim.acquire(1)
            order.append((name, time.monotonic()))

        tasks = [asyncio.create_task(waiter(n)) for n in ("a", "b")]
        await asyncio.sleep(0.3)
        assert order == []  # the first request is still in flight: nobody gets in
        lim.settle(first)
        settled = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)  # a never settles: b gets in after hold_s
        return settled, order

    settled, order = asyncio.run(go())
    assert [n for n, _ in order] == ["a", "b"]
    assert 0.19 <= order[0][1] - settled < 0.5
    assert order[1][1] - order[0][1] >= 0.69  # a's hold_s (0.5) and a window (0.2)


def test_settings_from_the_manifest(monkeypatch):
    from stages.adjudicate import AdjudicateConfig

    assert limiter_settings(AdjudicateConfig(judge="openai")) is None
    settings = limiter_settings(AdjudicateConfig(judge="openai", requests_per_minute=500, tokens_per_minute=9e5))
    assert settings["requests"] == 500 and settings["tokens"] == 9e5 and settings["window_s"] == 60.0
    monkeypatch.setattr(limits, "WINDOW_S", 2.0)
    assert limiter_settings(AdjudicateConfig(judge="openai", requests_per_minute=5))["window_s"] == 2.0


def test_token_estimate_counts_text_images_and_the_reply():
    messages = [{"role": "system", "content": "x" * 10},
                {"role": "user", "content": [{"type": "text", "text": "y" * 7},
                                             {"type": "image_url", "image_url": {"url": "data:..."}}]}]
    assert estimate_prompt_tokens(messages) == 5 + limits.IMAGE_TOKENS
    assert estimate_tokens(messages, 300) == 305 + limits.IMAGE_TOKENS


# --- four Ray judge actors, one limit ------------------------------------------------------------------

@pytest.mark.slow  # about 2.5 minutes on 2 busy CPUs, mostly the judge actors starting
def test_limits_hold_across_four_ray_judge_actors(sample_manifest_args, tmp_path, monkeypatch):
    """adjudicate.workers=4 under the Ray plan: the server's log never holds more than the limits in
    any window, and the actors together still reach the limits (a 2 s window stands for the minute)."""
    import ray

    from pipeline.manifest import load_manifest
    from pipeline.runner import _execute_ray, build_stages
    from test_llm_judge import KEY_ENV, SECRET, sample

    window = 2.0
    monkeypatch.setattr(limits, "WINDOW_S", window)
    monkeypatch.setenv(KEY_ENV, SECRET)
    records = [sample(i) for i in range(24)]
    rows = [{"seq": i, "shard": 0, "key": r["key"], "status": "ok", "record": dumps(r), "log": "[]", "times": "{}"}
            for i, r in enumerate(records)]
    manifest_file = Path(__file__).parents[1] / "manifests" / "sample-random.yaml"

    def run(server, **adjudicate):
        sets = sample_manifest_args + [
            "runtime.executor=ray", "runtime.cpu_batch_size=4", "adjudicate.judge=openai", "adjudicate.model=fake-judge",
            f"adjudicate.base_url={server.url}", f"adjudicate.api_key_env={KEY_ENV}", "adjudicate.workers=4",
            "adjudicate.batch_size=4", "adjudicate.concurrency=4", "adjudicate.max_tokens=300"]
        sets += [f"adjudicate.{k}={v}" for k, v in adjudicate.items()]
        # a fresh output folder each run: the judge would reuse the answers journaled in the last one
        manifest = load_manifest(manifest_file, sets, out=str(tmp_path / f"out-{server.port}"))
        first = [s.name for s in build_stages(manifest)].index("adjudicate")
        out = [row for batch in _execute_ray(manifest, rows, first=first) for row in batch["log"]]
        assert len(out) == len(rows)
        assert {entry["decided_by"] for log in out for entry in json.loads(log)} == {"llm"}
        assert len(server.requests) == len(rows)  # one request each, no retries
        received = sorted(r.received for r in server.requests)
        return server.window_peaks(window), received[-1] - received[0]

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {KEY_ENV: SECRET}})
    try:
        # requests bind: 6 a window
        with FakeJudgeServer(latency_ms=30) as server:
            (peak_requests, _), span = run(server, requests_per_minute=6)
        print(f"requests limit 6 a window: peak {peak_requests}, {len(rows)} requests in {span:.2f} s")
        assert peak_requests == 6
        assert len(rows) / (span + window) >= 0.7 * 6 / window  # at least 70% of the limit

        # tokens bind: four requests' usage a window (three settled, one more estimated in flight)
        with FakeJudgeServer(latency_ms=30) as probe:
            from test_llm_judge import config, run as run_local

            run_local(config(probe, max_tokens=300), [records[0]])
            usage = probe.requests[0].tokens
            estimate = estimate_tokens(probe.requests[0].body["messages"], 300)
        limit = estimate + 3.5 * usage
        with FakeJudgeServer(latency_ms=30) as server:
            (peak_requests, peak_tokens), span = run(server, tokens_per_minute=limit)
            used = sum(r.tokens for r in server.requests)
        print(f"tokens limit {limit:.0f} a window: peak {peak_tokens} tokens / {peak_requests} requests, "
              f"{used} tokens in {span:.2f} s")
        assert peak_tokens <= limit and peak_requests <= 4
        assert used / (span + window) >= 0.7 * limit / window
    finally:
        ray.shutdown()
