"""The load generator's prompts (tools/loadgen.py): what it sends shapes what a sweep measures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import loadgen  # noqa: E402


def test_each_load_level_has_prompt_texts_of_its_own():
    """Same lengths at every level, different words: with one text for all levels, each level after
    the first found its prompts in the server's prefix cache and prefilled less than it should."""
    levels = [loadgen.workload_prompts(loadgen.WORKLOAD_FILE, 30, None, None, 1.3, text_seed=k) for k in (0, 1, 2)]
    for other in levels[1:]:
        assert [(p["_target"], p["max_tokens"]) for p in other] == [(p["_target"], p["max_tokens"]) for p in levels[0]]
        assert all(a["prompt"].split()[:3] != b["prompt"].split()[:3] for a, b in zip(levels[0], other, strict=True))
    assert levels[1] == loadgen.workload_prompts(loadgen.WORKLOAD_FILE, 30, None, None, 1.3, text_seed=1)  # reproducible
