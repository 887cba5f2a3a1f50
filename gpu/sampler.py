"""Token sampling from the last-position logits of each request: greedy, temperature, top-k, top-p.

The whole batch is drawn in a fixed number of torch ops on the logits' device, with no host sync.
Seeded requests draw token n from noise that is a pure function of (seed, n, vocab position), so the
same seed gives the same tokens whatever else shares the batch, and after a preemption too. The noise
is bit-identical on every device; draws on two devices differ only where float rounding of the same
logits decides a near-tie.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class SampleSpec:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    index: int = 0  # which completion token this draw is (for seeded draws)
    logprobs: int = -1  # -1: none; k >= 0: the drawn token's log-probability and the top k (`token_logprobs`)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, specs: list[SampleSpec], argmax=None) -> torch.Tensor:
    """logits (S, V) -> token ids (S,) int64, on logits' device; no host sync. The ops launched
    depend on which options the batch uses, never on how many rows it has. Greedy rows take the
    argmax of the logits in their own dtype (16-bit logits convert to float32 exactly, so the
    choice is the same, at half the bytes read); drawn rows are converted to float32 first.
    `argmax`: what computes the greedy rows' argmax (gpu/fused_ops.CudaOps.argmax on CUDA, which
    returns exactly torch.argmax's ids); torch.argmax if None."""
    argmax = argmax or (lambda x: x.argmax(dim=-1))
    rows = [i for i, s in enumerate(specs) if not s.greedy]
    if not rows:
        return argmax(logits)
    drawn = [specs[i] for i in rows]
    p = _Params.of(rows, drawn, logits.device)
    ids = _draw((logits if len(rows) == len(specs) else logits.index_select(0, p.row)).float(), drawn, p)
    if len(rows) == len(specs):
        return ids
    return argmax(logits).index_copy_(0, p.row, ids)


class _Params(NamedTuple):
    """The drawn rows' options as (R,) device tensors (Rs for `seeded`), from one host->device copy."""

    row: torch.Tensor  # int64, the row of logits each comes from
    top_k: torch.Tensor  # int64, 0: off
    top_p: torch.Tensor  # float32, inf: off (so no rounding in the cumsum can drop a token)
    temperature: torch.Tensor  # float32
    seed: torch.Tensor  # int64, -1: unseeded
    index: torch.Tensor  # int64
    seeded: torch.Tensor  # int64 (Rs,), positions in 0..R-1 of the seeded rows

    @staticmethod
    def of(rows: list[int], drawn: list[SampleSpec], device: torch.device) -> _Params:
        r = len(rows)
        floats = [s.top_p if s.top_p < 1.0 else float("inf") for s in drawn] + [s.temperature for s in drawn]
        host = (rows + [s.top_k for s in drawn]  # then the floats' float64 bits, then the int64s again
                + list(struct.unpack(f"<{2 * r}q", struct.pack(f"<{2 * r}d", *floats)))
                + [-1 if s.seed is None else s.seed for s in drawn] + [s.index for s in drawn]
                + [j for j, s in enumerate(drawn) if s.seed is not None])
        cuda = device.type == "cuda"
        t = torch.tensor(host, dtype=torch.int64, pin_memory=cuda).to(device, non_blocking=cuda)
        f = t[2 * r:4 * r].view(torch.float64).float()
        return _Params(t[:r], t[r:2 * r], f[:r], f[r:], t[4 * r:5 * r], t[5 * r:6 * r], t[6 * r:])


def _draw(logits: torch.Tensor, drawn: list[SampleSpec], p: _Params) -> torch.Tensor:
    """logits (R, V) of the rows to draw -> (R,) int64 token ids."""
    # Shift the top logit to 0 before scaling: then no temperature, however small, makes inf or NaN.
    x = (logits - logits.amax(dim=-1, keepdim=True)).div_(p.temperature[:, None])  # (R, V), <= 0
    k_max = min(max(s.top_k for s in drawn), x.shape[1])
    cols = None  # (R, V) vocab position of each column of x, once x is sorted
    if any(s.top_p < 1.0 for s in drawn):
        x, cols = x.sort(dim=-1, descending=True, stable=True)  # stable: ties keep vocab order
        if k_max:
            _mask_top_k(x, x, p.top_k)
        probs = torch.softmax(x, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        x.masked_fill_(probs.cumsum(dim=-1).sub_(probs) >= p.top_p[:, None], float("-inf"))
    elif k_max:
        _mask_top_k(x, x.topk(k_max, dim=-1).values, p.top_k)
    # Gumbel-max: the argmax of log p + Gumbel noise is a draw from p, every row in one argmax.
    n_seeded = sum(s.seed is not None for s in drawn)
    if n_seeded == len(drawn):
        u = seeded_uniform(p.seed, p.index, _vocab(x) if cols is None else cols)
    else:
        u = torch.rand(x.shape, device=x.device).clamp_(min=torch.finfo(torch.float32).tiny)
        if n_seeded:
            c = _vocab(x) if cols is None else cols.index_select(0, p.seeded)
            u[p.seeded] = seeded_uniform(p.seed[p.seeded], p.index[p.seeded], c)
    pick = x.sub_(u.log_().neg_().log_()).argmax(dim=-1)  # x - log(-log u); finite noise, x <= 0: no NaN
    return pick if cols is None else cols.gather(1, pick[:, None]).squeeze(1)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of logits (S, V) where row rows[i] keeps only the tokens bitmask[i] allows (bit j % 32
    of int32 word j // 32 set: token j allowed) and the others are -inf. `bitmask` (R, >= V/32)
    may be on the host (pinned: the copy does not wait). The logits themselves are left as they
    are, for the logprobs, which report the model's distribution."""
    dev, cuda = logits.device, logits.device.type == "cuda"
    idx = torch.tensor(rows, dtype=torch.int64, pin_memory=cuda).to(dev, non_blocking=cuda)
    words = bitmask.to(dev, non_blocking=cuda)
    shifts = torch.arange(32, dtype=torch.int32, device=dev)
    allowed = ((words[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, :logits.shape[1]].bool()
    return logits.index_copy(0, idx, logits.index_select(0, idx).masked_fill_(~allowed, float("-inf")))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, specs: list[SampleSpec]) -> tuple[torch.Tensor, list[int]]:
    """The log-probabilities the rows asking for them (`spec.logprobs` >= 0) report: logits (S, V)
    and their sampled ids (S,) -> ((R, 1 + 2k) float32, the R rows), k the largest ask. A row
    holds the sampled id's log-probability, then the top k log-probabilities (descending), then
    their vocab ids as floats (exact below 2**24). Log-softmax of the raw logits: what the model
    says, before temperature, top-k or top-p. One small tensor, so one small copy to the host."""
    rows = [i for i, s in enumerate(specs) if s.logprobs >= 0]
    k = min(max(specs[i].logprobs for i in rows), logits.shape[1])
    if len(rows) < len(specs):
        cuda = logits.device.type == "cuda"
        pick = torch.tensor(rows, dtype=torch.int64, pin_memory=cuda).to(logits.device, non_blocking=cuda)
        logits, ids = logits.index_select(0, pick), ids.index_select(0, pick)
    x = logits.float().log_softmax(dim=-1)
    parts = [x.gather(1, ids[:, None])]
    if k:
        top = x.topk(k, dim=-1)  # sorted, descending
        parts += [top.values, top.indices.float()]
    return torch.cat(parts, dim=1), rows


def _mask_top_k(x: torch.Tensor, desc: torch.Tensor, top_k: torch.Tensor) -> None:
    """Set to -inf the entries of x (R, V) below their row's k-th largest; `desc` (R, >= max k)
    holds each row's largest values in descending order; rows with top_k 0 are left as they are."""
    k = top_k.clamp(1, desc.shape[1])[:, None]  # (R, 1)
    kth = desc.gather(1, k - 1).masked_fill_(top_k[:, None] == 0, float("-inf"))
    x.masked_fill_(x < kth, float("-inf"))


def _vocab(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device)[None]  # (1, V)


_M32 = 0xFFFFFFFF


def seeded_uniform(seed: torch.Tensor, index: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1) of seeded draws: seed, index (R,) int64, cols (R or 1, V) int64 vocab
    positions -> (R, V) float32, a pure function of (seed, index, col), bit-identical on any device
    (integer ops, then an exact conversion: 2**23 levels, the odd multiples of 2**-24)."""
    k = _mix32((seed >> 32) ^ 0x9E3779B9)
    k = _mix32(k ^ (seed & _M32))
    k = _mix32(k ^ (index & _M32))
    ka = (k | 1)[:, None]  # odd: col -> col * ka + kb is one-to-one mod 2**32
    kb = _mix32(k ^ 0x85EBCA6B)[:, None]
    h = _mix32((cols * ka).add_(kb).bitwise_and_(_M32))  # (R, V); col < 2**31, so no overflow
    return h.bitwise_right_shift_(9).mul_(2).add_(1).float().mul_(2.0**-24)  # < 2**24: exact in float32


# lowbias32's multipliers (C. Wellons), each as the int64 in (-2**31, 2**31) that is congruent to it
# mod 2**32: then x * c stays inside int64 for any x in [0, 2**32), and & 0xFFFFFFFF keeps x * c mod 2**32.
_C1, _C2 = 0x7FEB352D, 0x846CA68B - 2**32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, a bijection on 32-bit words held in int64 (values in [0, 2**32)); in place on x."""
    t = torch.empty_like(x)  # one scratch for the shifts: each op here is a full pass over (R, V)
    torch.bitwise_right_shift(x, 16, out=t)
    x ^= t
    x.mul_(_C1).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=t)
    x ^= t
    x.mul_(_C2).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=t)
    x ^= t
    return x
