"""Which trio tasks hold a server's event loop, and for how long: a diagnostic for `loop_lag`.

Put this directory first on PYTHONPATH and start the server as usual; Python imports this module at
start-up, and the server's `trio.run` then runs with an instrument that times every task step (from
one checkpoint to the next). At exit it writes a table of the tasks with the most time, to
$TASK_HOGS_OUT (default task_hogs.txt in the working directory). Other processes (the load
generator, helpers) are left alone. For example, with the load sweep:

    PYTHONPATH=tools/task_hogs:$PYTHONPATH TASK_HOGS_OUT=/tmp/hogs.txt \\
        tools/load_sweep.sh /tmp/run "--model random:qwen2.5-0.5b" "--rates 56,120 --warmup 8"

The instrument costs ~1-2 us a task step, so compare runs made with it on only.
"""

from __future__ import annotations

import atexit
import collections
import os
import time

import trio

_run = trio.run


class TaskHogs(trio.abc.Instrument):
    """Per task name: steps, total seconds, steps over 5 ms and over 15 ms, the longest step."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0, 0, 0.0])

    def before_task_step(self, task) -> None:
        self.t0 = time.perf_counter()

    def after_task_step(self, task) -> None:
        d = time.perf_counter() - self.t0
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
        return "\n".join(lines) + "\n"


def _instrumented_run(fn, *args, **kw):
    if getattr(fn, "__name__", "") != "run_server":  # streamer/__main__.py's server entry point only
        return _run(fn, *args, **kw)
    hogs = TaskHogs()
    kw["instruments"] = [*kw.get("instruments", ()), hogs]
    out = os.environ.get("TASK_HOGS_OUT", "task_hogs.txt")
    atexit.register(lambda: open(out, "w").write(hogs.table()))
    return _run(fn, *args, **kw)


trio.run = _instrumented_run
