"""tools/task_hogs: the table names the task that held the event loop."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("task_hogs", ROOT / "tools" / "task_hogs" / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    real = trio.run
    try:
        spec.loader.exec_module(module)  # it wraps trio.run for server processes: undone here
    finally:
        trio.run = real
    return module


def test_the_table_names_the_task_that_blocked_the_loop():
    hogs = _load().TaskHogs()

    async def blocker():
        await trio.sleep(0)
        time.sleep(0.03)  # noqa: ASYNC251 - blocking on purpose, as a slow launch would

    async def polite():
        for _ in range(20):
            await trio.sleep(0)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocker)
            nursery.start_soon(polite)

    trio.run(main, instruments=[hogs])
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in hogs.table().split("\n\n")[0].splitlines()[2:]}
    name = next(n for n in rows if n.endswith("blocker"))
    _, steps, _, over5, over15, longest = rows[name]
    assert (int(steps), int(over5), int(over15)) == (2, 1, 1) and float(longest) >= 30
    polite_row = rows[next(n for n in rows if n.endswith("polite"))]
    assert int(polite_row[1]) == 21  # 20 yields + the final step
    assert list(rows)[0] == name  # most time first


def test_collector_pauses_are_timed_and_charged_to_the_step_they_fell_in():
    hogs = _load().TaskHogs()

    async def collector():
        await trio.sleep(0)
        garbage = [[i] for i in range(200_000)]
        garbage.append(garbage)  # a cycle: only the collector frees it
        del garbage
        import gc
        gc.collect()

    import gc
    gc.callbacks.append(hogs.gc_callback)
    try:
        trio.run(collector, instruments=[hogs])
    finally:
        gc.callbacks.remove(hogs.gc_callback)
    table = hogs.table()
    gen_rows = [line for line in table.splitlines() if line.startswith("| 2 |")]
    assert gen_rows and int(gen_rows[0].split(" | ")[1]) >= 1
    longest = [line.strip("| ").split(" | ") for line in table.split("longest task steps")[1].splitlines()[2:]]
    name, ms, gc_ms = longest[0]
    assert name.endswith("collector") and 0 < float(gc_ms) <= float(ms)
