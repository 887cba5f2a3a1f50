"""The shared benchmark workload (gpu/workload.json, a copy of the project's reference file)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORKLOAD_FILE = Path(__file__).resolve().parents[1] / "gpu" / "workload.json"


@dataclass(frozen=True)
class Item:
    prompt: list[int]
    output_len: int


def load_spec(path: Path = WORKLOAD_FILE) -> dict:
    return json.loads(Path(path).read_text())


def requests(spec: dict | None = None, n: int | None = None) -> list[Item]:
    """The workload's requests, drawn with random.Random(seed) in a fixed order per request:
    prompt length, output length, then the prompt's ids."""
    spec = spec or load_spec()
    rng = random.Random(spec["seed"])
    items = []
    for _ in range(spec["num_requests"] if n is None else n):
        plen = rng.randint(spec["prompt_min"], spec["prompt_max"])
        olen = rng.randint(spec["output_min"], spec["output_max"])
        items.append(Item([rng.randrange(100, 32000) for _ in range(plen)], olen))
    return items
