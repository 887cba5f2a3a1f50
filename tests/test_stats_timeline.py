"""tools/stats_timeline.py reads the /stats a server gives under its latency controller."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import trio

from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("stats_timeline", ROOT / "tools" / "stats_timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_row_shows_the_budget_cap_and_decision_the_controller_set():
    tool = load_tool()
    config = EngineConfig(model="random:tiny-qwen3", kv_blocks=64, max_running=8, slo_ttft_ms=200, slo_itl_ms=25)
    lines = []
    async with open_engine(config) as engine:
        lines.append(json.dumps(engine.snapshot()))  # before any request: no decision yet
        engine.controller.period_s = 0.0  # decide every few steps
        async def run(tokens):
            with trio.fail_after(60):
                gen = engine.generate("hello", SamplingParams(max_tokens=tokens, ignore_eos=True))
                async with gen:
                    async for _ in gen:
                        pass

        await run(24)
        engine.controller.period_s = 1e9  # no more decisions: the next step applies these as they are
        engine.controller.budget, engine.controller.running_cap = 96, 3
        await run(2)
        lines.append(json.dumps(engine.snapshot()))
        last = engine.controller.last
    out = tool.timeline(lines + [""]).splitlines()
    assert out[0].startswith("| uptime s | running | waiting | budget | running cap | decision")
    first, second = (line.split("|")[1:-1] for line in out[2:4])
    assert [c.strip() for c in first[1:7]] == ["0", "0", "8192", "", "", "0"]
    assert [c.strip() for c in second[1:7]] == ["0", "0", "96", "3", f"{last.action}/{last.cap_action}", "0"]
    assert float(second[9]) > 0 and float(second[11]) >= 0  # ITL and loop lag P99s of the window
    itl, _decode, _ttft = (c.strip() for c in second[12].split("/"))  # what the last decision saw
    assert float(itl) == round(last.itl_p99_s * 1000, 1) and second[13].strip() == str(last.refused)
    assert first[12].strip() == "" and first[13].strip() == ""  # no decision yet
    assert out[-1].startswith("whole run (since start), ms: ttft p99 ")
    assert len(tool.timeline(lines, every=2).splitlines()) == 2 + 1 + 2  # header, one row, summary
