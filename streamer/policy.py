"""Scheduling policies (`--policy`): the order in which waiting requests are admitted, the share of a
step's token budget kept for prefills, and which running request is preempted. Plain Python.

Pure functions of the scheduler's state: the scheduler owns the queues and calls these each step.
Policies compose (`--policy priority,first-token,fair`); `fcfs` alone is arrival order.

- `priority`: higher `priority` classes are admitted first. Aging keeps every class moving: a
  request gains one class per `aging_s` seconds of waiting, so it is never overtaken by a request
  that arrived more than (d + 1) * aging_s seconds after it, d being how many classes higher that
  request asked for.
- `length`: prefer requests whose remaining length (max_tokens) is in the same power-of-two bucket
  as the running batch's median, so a batch tends to finish together. A request that waited
  `aging_s` seconds loses that penalty and is ordered by arrival again.
- `fair`: round-robin admission across clients (a websocket connection, an HTTP remote address),
  evened out by how many requests each client already runs; and while another client is waiting,
  no client is admitted past ceil(max_running / active clients) running requests. Enforced at
  admission only: a client already above its share is not preempted, it just gets no new slot.
- `first-token`: while prefills are pending, `prefill_share` of each step's budget is kept for them
  (running prefills, then admissions), so a new request's first token is not starved by long
  decodes. Decodes may then be deferred a step when the budget is short; budget the prefills
  could not use goes back to the deferred decodes in the same step.

Requests preempted for memory always come back first, oldest first, ahead of every new arrival.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamer.scheduler import Sequence

NAMES = ("fcfs", "priority", "first-token", "length", "fair")


@dataclass(frozen=True)
class Policy:
    priority: bool = False
    first_token: bool = False
    length: bool = False
    fair: bool = False
    prefill_share: float = 0.25  # of the step budget, kept for prefills by `first_token`
    aging_s: float = 10.0  # seconds of waiting worth one priority class (and the end of the length penalty)

    def __post_init__(self) -> None:
        if not 0 < self.prefill_share < 1:
            raise ValueError("prefill_share must be in (0, 1)")
        if not self.aging_s > 0:
            raise ValueError("aging_s must be > 0")

    @classmethod
    def parse(cls, spec: str, prefill_share: float = 0.25, aging_s: float = 10.0) -> Policy:
        """'fcfs', or a comma-separated set of the other names."""
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in NAMES]
        if not names or unknown:
            raise ValueError(f"policy must be 'fcfs' or a comma-separated set of {', '.join(NAMES[1:])}; got {spec!r}")
        if "fcfs" in names and len(names) > 1:
            raise ValueError("'fcfs' is the plain arrival order and does not combine with other policies")
        return cls("priority" in names, "first-token" in names, "length" in names, "fair" in names,
                   prefill_share, aging_s)

    @property
    def reorders(self) -> bool:
        """Whether admission order may differ from the waiting queue's order."""
        return self.priority or self.length or self.fair

    # --- admission order ---------------------------------------------------------------------------
    def effective_priority(self, seq: Sequence, now: float) -> int:
        return seq.priority + int((now - seq.t_arrival) // self.aging_s)

    def admission_order(self, waiting: list[Sequence], running: list[Sequence], now: float) -> list[Sequence]:
        """`waiting` (resumed requests first, by arrival, then new ones) in the order to admit them."""
        resumed = [s for s in waiting if s.num_preemptions]
        new = [s for s in waiting if not s.num_preemptions]
        # One key per waiting request per step, so kept to plain arithmetic. A new request has no
        # output yet: its remaining length is its max_tokens.
        priority, length, aging = self.priority, self.length, self.aging_s
        target = self._length_target(new, running) if length else 0

        def key(seq: Sequence) -> tuple[int, int, int]:
            waited = now - seq.t_arrival
            prio = -seq.priority - int(waited // aging) if priority else 0
            dist = abs(seq.max_tokens.bit_length() - target) if length and waited < aging else 0
            return prio, dist, seq.arrival

        new.sort(key=key)
        if self.fair:
            # Round-robin: a client's k-th waiting request ranks as if it already ran k more.
            seen = Counter(s.client for s in running)
            ranks = {}
            for s in new:
                ranks[id(s)] = seen[s.client]
                seen[s.client] += 1
            new.sort(key=lambda s: ranks[id(s)])  # stable: the policy order within a rank
        return resumed + new

    def _length_target(self, new: list[Sequence], running: list[Sequence]) -> int:
        pool = running or new[:1]
        if not pool:
            return 0
        buckets = sorted(_bucket(s) for s in pool)
        return buckets[len(buckets) // 2]

    def client_share(self, max_running: int, clients: int) -> int:
        """Most running requests one client may hold while another client waits (`fair`)."""
        return math.ceil(max_running / max(1, clients))

    # --- step budget ---------------------------------------------------------------------------
    def prefill_reserve(self, budget: int, pending_prefill: int) -> int:
        """Tokens of this step's budget kept from decodes for pending prefill tokens."""
        if not self.first_token:
            return 0
        return min(pending_prefill, math.ceil(self.prefill_share * budget))

    # --- preemption --------------------------------------------------------------------------
    def victim_key(self, seq: Sequence) -> tuple:
        """Smallest is preempted first: the lowest priority class (when `priority` is on), then
        the least recently scheduled, then the latest arrival. Within a class, a request scheduled
        every step is preempted only after every younger one, so the oldest always progresses."""
        return (seq.priority if self.priority else 0), seq.last_step, -seq.arrival


def _bucket(seq: Sequence) -> int:
    """Power-of-two bucket of the tokens the request may still generate."""
    return max(1, seq.max_tokens - len(seq.output_ids)).bit_length()
