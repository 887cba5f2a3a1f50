"""Scheduling policies with fake model outputs and a mock clock: which requests are admitted,
scheduled and preempted in which order under each policy; the aging bound, the fairness share, the
first-token budget share, the admission cap; and the `priority` field at the websocket and HTTP edges."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from streamer.allocator import BlockAllocator
from streamer.config import EngineConfig
from streamer.policy import Policy
from streamer.scheduler import Scheduler, Sequence, Status

BS = 4


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(policy="fcfs", num_blocks=64, budget=64, max_running=8, **knobs):
    clock = Clock()
    s = Scheduler(BlockAllocator(num_blocks), BS, budget, max_running, policy=Policy.parse(policy, **knobs), clock=clock)
    return s, clock


def seq(rid, prompt_len=2, max_tokens=4, priority=0, client=""):
    return Sequence(rid, list(range(1, prompt_len + 1)), max_tokens, priority=priority, client=client)


def step(s, token=7):
    plan = s.schedule()
    assert plan.num_tokens <= s.max_batch_tokens
    s.update(plan, [token if c.sample else None for c in plan.chunks])
    return plan


def admitted(plan):
    """Ids of the requests whose first chunk (position 0) ran in this plan."""
    return [c.seq.request_id for c in plan.chunks if c.start == 0]


def ids(plan):
    return [c.seq.request_id for c in plan.chunks]


# --- parsing -----------------------------------------------------------------------------------


def test_policy_names_compose_and_bad_ones_are_refused():
    p = Policy.parse("priority, first-token,fair")
    assert (p.priority, p.first_token, p.length, p.fair) == (True, True, False, True)
    assert Policy.parse("fcfs") == Policy()
    for bad in ("", "lifo", "fcfs,priority", "priority,,nope"):
        with pytest.raises(ValueError):
            Policy.parse(bad)
    with pytest.raises(ValueError):
        EngineConfig(model="random:tiny-qwen3", policy="priority", static_batch=4)
    with pytest.raises(ValueError):
        EngineConfig(model="random:tiny-qwen3", prefill_share=1.0)
    for bad in ({"preemption": "lifo"}, {"preemption": "swap", "swap_space": 0}, {"swap_space": -1}):
        with pytest.raises(ValueError):
            EngineConfig(model="random:tiny-qwen3", **bad)


# --- admission order ---------------------------------------------------------------------------


def test_fcfs_admits_in_arrival_order_whatever_the_priority():
    s, _ = make("fcfs", max_running=2)
    for rid, prio in (("low", 0), ("high", 9), ("mid", 3)):
        s.add(seq(rid, priority=prio))
    assert admitted(step(s)) == ["low", "high"]


def test_priority_admits_higher_classes_first_then_arrival():
    s, _ = make("priority", max_running=3)
    for rid, prio in (("low", 0), ("high", 9), ("mid", 3), ("high2", 9)):
        s.add(seq(rid, priority=prio))
    assert admitted(step(s)) == ["high", "high2", "mid"]
    assert [q.request_id for q in s.waiting] == ["low"]


def test_aging_bounds_the_wait_of_a_low_class():
    """One slot; a class-2 request arrives every second and takes it for one step. The class-0
    request gains a class per 10 s of waiting: at 20 s it ties with a fresh class-2 request and wins
    on arrival, so it waits exactly (2 - 0) * aging_s. Without aging it would wait forever."""
    s, clock = make("priority", max_running=1, aging_s=10.0)
    low = seq("low", max_tokens=1, priority=0)
    s.add(low)
    admitted_at = None
    for t in range(1, 40):
        clock.now = float(t)
        s.add(seq(f"high{t}", max_tokens=1, priority=2))
        if "low" in admitted(step(s)):
            admitted_at = clock.now
            break
    assert admitted_at == 20.0
    # Effective priority rises by one class per aging_s of waiting.
    assert [Policy(priority=True, aging_s=10.0).effective_priority(low, t) for t in (0, 9.9, 10, 25)] == [0, 0, 1, 2]


def test_length_grouping_prefers_the_running_batch_bucket_until_aging():
    s, clock = make("length", max_running=2, aging_s=5.0)
    s.add(seq("long", max_tokens=100))  # remaining 100: bucket 7 (64..127)
    step(s)
    s.add(seq("short", max_tokens=3))
    s.add(similar := seq("similar", max_tokens=90))
    s.add(seq("tiny", max_tokens=2))
    assert admitted(step(s)) == ["similar"]  # the one slot goes to the running batch's bucket
    s.finish(similar, "cancelled")
    clock.now = 5.0  # "short" and "tiny" have waited aging_s: back to arrival order
    assert admitted(step(s)) == ["short"]


def test_length_grouping_with_nothing_running_follows_the_oldest_request():
    s, _ = make("length", max_running=2)
    for rid, n in (("a", 200), ("b", 3), ("c", 150), ("d", 2)):
        s.add(seq(rid, max_tokens=n))
    assert admitted(step(s)) == ["a", "c"]


def test_fair_admits_round_robin_across_clients():
    s, _ = make("fair", max_running=4)
    for i in range(5):
        s.add(seq(f"A{i}", client="A"))
    s.add(seq("B0", client="B"))
    s.add(seq("B1", client="B"))
    s.add(seq("C0", client="C"))
    assert admitted(step(s)) == ["A0", "B0", "C0", "A1"]
    fcfs, _ = make("fcfs", max_running=4)
    for q in ["A0", "A1", "A2", "A3", "A4", "B0", "B1", "C0"]:
        fcfs.add(seq(q, client=q[0]))
    assert admitted(step(fcfs)) == ["A0", "A1", "A2", "A3"]


def test_fair_share_holds_whenever_another_client_waits():
    """A client that arrived alone filled the batch; once another waits, every slot A frees goes
    to B until B holds its share, ceil(max_running / clients) = 2, and no admission takes a client
    past its share while another client waits."""
    s, _ = make("fair", max_running=4)
    for i in range(8):
        s.add(seq(f"A{i}", max_tokens=2 + i, client="A"))  # staggered lengths: one finishes per step
    assert admitted(step(s)) == ["A0", "A1", "A2", "A3"]
    for i in range(4):
        s.add(seq(f"B{i}", max_tokens=50, client="B"))
    order = []
    while len(order) < 4:
        running = Counter(q.client for q in s.running)
        waiting = {q.client for q in s.waiting}
        for rid in admitted(step(s)):
            assert running[rid[0]] < 2 or waiting <= {rid[0]}, (rid, running)
            running[rid[0]] += 1
            order.append(rid)
    assert order == ["B0", "B1", "A4", "A5"]  # fcfs would admit A4 .. A7


# --- the step budget ---------------------------------------------------------------------------


def start_decodes(s, n):
    for i in range(n):
        s.add(seq(f"d{i}", prompt_len=1, max_tokens=1000))
    step(s)
    assert all(q.status is Status.RUNNING and q.num_tokens - q.num_computed == 1 for q in s.running)


def test_first_token_keeps_a_share_of_the_budget_for_prefills():
    s, _ = make("first-token", budget=16, max_running=32, prefill_share=0.25)
    start_decodes(s, 14)
    s.add(seq("new", prompt_len=20, max_tokens=1))
    plans = [step(s) for _ in range(5)]
    # 25% of 16 = 4 tokens a step for the prompt: its 20 tokens take 5 steps; 12 decodes run.
    assert [[c.length for c in p.chunks if c.seq.request_id == "new"] for p in plans] == [[4]] * 5
    assert all(sum(c.length == 1 and c.seq.request_id != "new" for c in p.chunks) == 12 for p in plans)
    # Deferred decodes go first the next step: none waits two steps in a row.
    for prev, cur in itertools.pairwise(plans):
        skipped = {f"d{i}" for i in range(14)} - set(ids(prev))
        assert len(skipped) == 2 and skipped <= set(ids(cur))
    # Once no prefill is pending, decodes have the whole budget again.
    assert len(step(s).chunks) == 14

    fcfs, _ = make("fcfs", budget=16, max_running=32)
    start_decodes(fcfs, 14)
    fcfs.add(seq("new", prompt_len=20, max_tokens=1))
    first = step(fcfs)
    assert [c.length for c in first.chunks if c.seq.request_id == "new"] == [2]  # what decodes leave


def test_first_token_gives_unused_share_back_to_decodes():
    s, _ = make("first-token", num_blocks=14, budget=16, max_running=32)
    start_decodes(s, 14)  # 14 one-token prompts hold all 14 blocks
    s.add(seq("new", prompt_len=20, max_tokens=1))  # needs blocks that are not there
    plan = step(s)
    assert "new" not in ids(plan) and len(plan.chunks) == 14  # the reserve went back to decodes


def test_max_running_can_change_between_steps():
    """As the controller sets it (streamer/batcher.py): raising the cap admits more, in order."""
    s, _ = make("fcfs", max_running=2)
    for r in "abcde":
        s.add(seq(r, max_tokens=8))
    assert admitted(step(s)) == ["a", "b"]
    s.max_running = 4
    assert admitted(step(s)) == ["c", "d"]
    s.max_running = 8
    assert admitted(step(s)) == ["e"]


def test_max_batch_tokens_can_change_between_steps():
    s, _ = make("fcfs", budget=64)
    s.add(seq("p", prompt_len=30, max_tokens=1))
    s.max_batch_tokens = 8
    assert [c.length for c in step(s).chunks] == [8]
    s.max_batch_tokens = 64
    assert [c.length for c in step(s).chunks] == [22]


# --- preemption ------------------------------------------------------------------------------


def test_victim_order_least_recently_scheduled_then_latest_arrival_then_class():
    def q(rid, last_step, arrival, priority=0):
        x = seq(rid, priority=priority)
        x.last_step, x.arrival = last_step, arrival
        return x

    pool = [q("old-recent", 5, 0), q("young-recent", 5, 2), q("stale", 4, 1, priority=3)]
    lru = sorted(pool, key=Policy().victim_key)
    assert [x.request_id for x in lru] == ["stale", "young-recent", "old-recent"]
    by_class = sorted(pool, key=Policy(priority=True).victim_key)
    assert [x.request_id for x in by_class] == ["young-recent", "old-recent", "stale"]


def test_preempts_the_least_recently_scheduled_not_the_most_recently_admitted():
    s, _ = make("fcfs", num_blocks=3, budget=64)
    a, b, c = seq("a", prompt_len=4, max_tokens=8), seq("b", prompt_len=4, max_tokens=8), seq("c", prompt_len=3)
    for x in (a, b, c):
        s.add(x)
    step(s)  # each holds one block (full for a and b) and has sampled a token
    # As if b had been deferred a step: it is now the least recently scheduled of the three.
    a.last_step = b.last_step = s.num_steps - 1
    plan = step(s)
    # a (served first: least recently scheduled, oldest) needs a block: b, the younger of the two
    # least recently scheduled, gives it up; the old rule would have taken c, the latest admitted.
    assert plan.preempted == (b,) and b.status is Status.WAITING
    assert ids(plan) == ["a", "c"]


def test_a_preempted_request_waits_ahead_of_new_arrivals_of_any_class():
    s, _ = make("priority", num_blocks=3, budget=64)
    a, b = seq("a", prompt_len=4, max_tokens=8), seq("b", prompt_len=4, max_tokens=8)
    s.add(a)
    s.add(b)
    step(s)  # a and b: one block each, one free
    step(s)  # a takes the free block for its 5th token ... b needs one too: b, the younger, goes
    assert b.status is Status.WAITING and b.num_preemptions == 1
    s.add(seq("vip", prompt_len=1, max_tokens=1, priority=10))
    assert [q.request_id for q in s.waiting] == ["b", "vip"]
    s.finish(a, "cancelled")
    assert admitted(step(s)) == ["b", "vip"]


def test_recomputed_tokens_count_the_kv_computed_again():
    s, _ = make("fcfs", num_blocks=3, budget=64)
    a, b = seq("a", prompt_len=4, max_tokens=8), seq("b", prompt_len=4, max_tokens=8)
    s.add(a)
    s.add(b)
    step(s)
    step(s)
    assert b.num_preemptions == 1 and s.recomputed_tokens == 0
    lost = b.computed_high  # its 4 prompt tokens had K/V in the arena
    s.finish(a, "cancelled")
    plan = step(s)
    assert [(c.start, c.length) for c in plan.chunks] == [(0, 5)]  # prompt + its one generated token
    assert s.recomputed_tokens == lost == 4


# --- the edges -------------------------------------------------------------------------------


@pytest.fixture
async def priority_server():
    from streamer.engine import open_engine
    from web.server import serve

    config = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=256, max_running=8,
                          max_waiting=8, policy="priority,fair,first-token,length")
    async with open_engine(config) as engine, trio.open_nursery() as nursery:
        binds = await nursery.start(serve, engine, "127.0.0.1", 0)
        yield engine, binds[0]
        nursery.cancel_scope.cancel()


async def test_websocket_priority_field_is_accepted_and_checked(priority_server):
    engine, url = priority_server
    with trio.fail_after(30):
        async with open_websocket_url(url.replace("http://", "ws://") + "/v1/stream") as ws:
            await ws.send_message(json.dumps({"type": "generate", "id": "p", "prompt": "hi", "max_tokens": 3,
                                              "priority": 5}))
            frames = []
            while not frames or frames[-1]["type"] != "done":
                frames.append(json.loads(await ws.get_message()))
            assert frames[-1]["finish_reason"] in ("length", "stop") and frames[-1]["id"] == "p"
            for bad in (11, -11, "high", 1.5, True):
                await ws.send_message(json.dumps({"type": "generate", "id": "bad", "prompt": "hi", "priority": bad}))
                err = json.loads(await ws.get_message())
                assert (err["type"], err["id"], err["code"]) == ("error", "bad", "invalid_request"), bad
                assert "priority" in err["message"]


async def test_openai_priority_field_is_accepted_and_checked(priority_server):
    engine, url = priority_server
    body = {"model": engine.model_name, "prompt": "hi", "max_tokens": 2}
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=url) as http:
            ok = await http.post("/v1/completions", json=body | {"priority": -3})
            bad = await http.post("/v1/completions", json=body | {"priority": 99})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_request" and bad.json()["error"]["param"] == "priority"
