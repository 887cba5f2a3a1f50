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
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in hogs.table().splitlines()[2:]}
    name = next(n for n in rows if n.endswith("blocker"))
    _, steps, _, over5, over15, longest = rows[name]
    assert (int(steps), int(over5), int(over15)) == (2, 1, 1) and float(longest) >= 30
    polite_row = rows[next(n for n in rows if n.endswith("polite"))]
    assert int(polite_row[1]) == 21  # 20 yields + the final step
    assert list(rows)[0] == name  # most time first
