"""Which trio tasks hold a server's event loop, and for how long: a diagnostic for `loop_lag`.

Put this directory first on PYTHONPATH and start the server as usual; Python imports this module at
start-up, and the server's `trio.run` then runs with an instrument that times every task step (from
one checkpoint to the next). At exit it writes a table of the tasks with the most time, then
the garbage collector's pauses by generation and the longest task steps with the collector's time
inside each (a long step is the task's own work unless most of it was a collection), to
$TASK_HOGS_OUT (default task_hogs.txt in the working directory). Other processes (the load
generator, helpers) are left alone. For example, with the load sweep:

    PYTHONPATH=tools/task_hogs:$PYTHONPATH TASK_HOGS_OUT=/tmp/hogs.txt \\
        tools/load_sweep.sh /tmp/run "--model random:qwen2.5-0.5b" "--rates 56,120 --warmup 8"

The instrument costs ~1-2 us a task step, so compare runs made with it on only.
"""

from __future__ import annotations

import atexit
import collections
import gc
import heapq
import os
import time

import trio

_run = trio.run


class TaskHogs(trio.abc.Instrument):
    """Per task name: steps, total seconds, steps over 5 ms and over 15 ms, the longest step."""

    LONGEST = 20  # task steps listed one by one

    def __init__(self) -> None:
        self.t0 = 0.0
        self.by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0, 0, 0.0])
        self.gc_by_gen: dict[int, list] = collections.defaultdict(lambda: [0, 0.0, 0, 0.0])
        self.gc_in_step = 0.0  # collector time inside the current task step
        self.longest: list[tuple[float, float, str]] = []  # heap of (seconds, gc seconds, task name)
        self._gc_t0 = 0.0

    def gc_callback(self, phase: str, info: dict) -> None:
        """For gc.callbacks: times each collection, by generation."""
        if phase == "start":
            self._gc_t0 = time.perf_counter()
            return
        d = time.perf_counter() - self._gc_t0
        self.gc_in_step += d
        g = self.gc_by_gen[info["generation"]]
        g[0] += 1
        g[1] += d
        g[2] += d > 0.005
        g[3] = max(g[3], d)

    def before_task_step(self, task) -> None:
        self.gc_in_step = 0.0
        self.t0 = time.perf_counter()

    def after_task_step(self, task) -> None:
        d = time.perf_counter() - self.t0
        item = (d, self.gc_in_step, task.name)
        if len(self.longest) < self.LONGEST:
            heapq.heappush(self.longest, item)
        elif d > self.longest[0][0]:
            heapq.heapreplace(self.longest, item)
        s = self.by_name[task.name]
        s[0] += 1
        s[1] += d
        s[2] += d > 0.005
        s[3] += d > 0.015
        s[4] = max(s[4], d)

    def table(self, rows: int = 15) -> str:
        lines = ["| task | steps | total s | steps > 5 ms | > 15 ms | longest ms |", "|---|---:|---:|---:|---:|---:|"]
        for name, (n, total, over5, over15, most) in sorted(self.by_name.items(), key=lambda kv: -kv[1][1])[:rows]:
            lines.append(f"| {name} | {n} | {total:.2f} | {over5} | {over15} | {most * 1e3:.1f} |")
        lines += ["", "| gc generation | collections | total s | > 5 ms | longest ms |", "|---:|---:|---:|---:|---:|"]
        for gen, (n, total, over5, most) in sorted(self.gc_by_gen.items()):
            lines.append(f"| {gen} | {n} | {total:.2f} | {over5} | {most * 1e3:.1f} |")
        lines += ["", "| longest task steps: task | ms | of it gc ms |", "|---|---:|---:|"]
        for d, in_gc, name in sorted(self.longest, reverse=True):
            lines.append(f"| {name} | {d * 1e3:.1f} | {in_gc * 1e3:.1f} |")
        return "\n".join(lines) + "\n"


def _instrumented_run(fn, *args, **kw):
    if getattr(fn, "__name__", "") != "run_server":  # streamer/__main__.py's server entry point only
        return _run(fn, *args, **kw)
    hogs = TaskHogs()
    gc.callbacks.append(hogs.gc_callback)
    kw["instruments"] = [*kw.get("instruments", ()), hogs]
    out = os.environ.get("TASK_HOGS_OUT", "task_hogs.txt")
    atexit.register(lambda: open(out, "w").write(hogs.table()))
    return _run(fn, *args, **kw)


trio.run = _instrumented_run
