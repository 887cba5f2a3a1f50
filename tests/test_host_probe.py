"""tools/host_probe.py: the table a reader checks a GPU host's steadiness with."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("host_probe", ROOT / "tools" / "host_probe.py")
host_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_probe)


def test_slow_share_and_the_longest_slow_run():
    # one sample a second: fast, two slow, fast, one slow, fast, three slow to the end
    ms = [70, 130, 125, 72, 140, 69, 120, 118, 131]
    s = host_probe.summary([(float(t), m) for t, m in enumerate(ms)], slow=1.3)
    assert s["fastest_ms"] == 69 and s["slowest_ms"] == 140 and s["median_ms"] == 120
    assert s["slow_share"] == pytest.approx(6 / 9)
    assert s["longest_slow_s"] == 2.0  # 1 s -> 3 s, and the last run (6 s -> 8 s) is as long


def test_a_steady_cpu_has_no_slow_samples():
    s = host_probe.summary([(0.0, 70.0), (1.0, 75.0), (2.0, 71.0)], slow=1.3)
    assert s["slow_share"] == 0 and s["longest_slow_s"] == 0


def test_cpu_lists():
    assert host_probe.parse_cpus("1,6") == [1, 6]
    assert host_probe.parse_cpus("2-4,9") == [2, 3, 4, 9]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "host_probe.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_it_prints_one_row_per_cpu():
    cpu = min(os.sched_getaffinity(0))
    out = _run("--cpus", str(cpu), "--seconds", "0.3", "--interval", "0.05", "--loop", "20000")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(f"| {cpu} |")]
    assert len(rows) == 1 and int(rows[0].split("|")[2]) >= 2  # at least two samples


def test_a_cpu_it_may_not_use_is_refused_by_name():
    missing = max(os.sched_getaffinity(0)) + 1
    out = _run("--cpus", str(missing), "--seconds", "0.1")
    assert out.returncode == 2
    assert f"not available to this process: [{missing}]" in out.stderr
