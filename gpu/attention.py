"""Attention over the KV arena: the per-step metadata, the backend interface, the torch reference.

The model calls ``backend.forward(layer, q, k, v, meta)`` once per layer per step. That one call
writes the step's new K/V into the arena at ``meta.slot_mapping`` and returns causal attention of
every new query token over its request's whole history (earlier chunks included). The batch is
ragged: tokens of all requests are flattened, ``cu_seqlens_q`` marks where each request starts.
The torch reference below is the CPU path and the oracle for the CUDA kernel (gpu/cuda_attention.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from gpu.arena import KVArena


@dataclass(frozen=True)
class AttnMetadata:
    """Where each request of the step sits, on the device and (for cheap loops) on the host.

    B requests, T = sum(q_lens) new tokens. Request i owns tokens
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``, whose positions are ``seq_lens[i]-q_len_i .. seq_lens[i]-1``.
    Its block table is ``block_tables[cu_blocks[i]:cu_blocks[i+1]]`` (flattened, no padding).
    """

    cu_seqlens_q: torch.Tensor  # (B+1,) int32, device
    seq_lens: torch.Tensor  # (B,) int32, device: context length including this step's tokens
    cu_blocks: torch.Tensor  # (B+1,) int32, device
    block_tables: torch.Tensor  # (sum blocks,) int32, device
    slot_mapping: torch.Tensor  # (T,) int64, device: arena slot of each new token
    max_q_len: int
    max_seq_len: int
    q_lens_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]
    block_tables_host: tuple[Sequence[int], ...]  # read by the torch reference backend only

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens_host)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.q_lens_host))


def flat_tables(tables) -> np.ndarray:
    """The block tables end to end, int32. The scheduler's are `array("i")`: one join of their
    buffers, about 50x faster than reading them element by element (lists still work)."""
    try:
        return np.frombuffer(b"".join(tables), dtype=np.int32)
    except TypeError:  # lists
        return np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32)


def build_metadata(
    q_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int, device
) -> AttnMetadata:
    """Build the step's metadata from host lists: numpy on the host, two host-to-device copies."""
    assert len(q_lens) == len(seq_lens) == len(block_tables) > 0
    q = np.asarray(q_lens, dtype=np.int64)
    lens = np.asarray(seq_lens, dtype=np.int64)
    nblocks = np.fromiter((len(t) for t in block_tables), dtype=np.int64, count=len(block_tables))
    assert (q >= 1).all() and (q <= lens).all() and (lens <= nblocks * block_size).all(), (q_lens, seq_lens)
    cu_q = np.concatenate(([0], np.cumsum(q)))
    cu_b = np.concatenate(([0], np.cumsum(nblocks)))
    flat = flat_tables(block_tables).astype(np.int64)
    # Position of every new token, and the arena slot its K/V goes to.
    seq_of_token = np.repeat(np.arange(len(q)), q)
    pos = np.arange(int(cu_q[-1])) - cu_q[seq_of_token] + (lens - q)[seq_of_token]
    slots = flat[cu_b[seq_of_token] + pos // block_size] * block_size + pos % block_size
    packed = torch.from_numpy(np.concatenate((cu_q, lens, cu_b, flat)).astype(np.int32)).to(device, non_blocking=True)
    b = len(q)
    cu_seqlens_q, seq_lens_t, cu_blocks, tables = packed.split([b + 1, b, b + 1, len(flat)])
    return AttnMetadata(
        cu_seqlens_q=cu_seqlens_q,
        seq_lens=seq_lens_t,
        cu_blocks=cu_blocks,
        block_tables=tables,
        slot_mapping=torch.from_numpy(slots).to(device, non_blocking=True),
        max_q_len=int(q.max()),
        max_seq_len=int(lens.max()),
        q_lens_host=tuple(q_lens),
        seq_lens_host=tuple(seq_lens),
        block_tables_host=tuple(block_tables),  # the callers' lists: not changed while the step runs
    )


class AttentionBackend(Protocol):
    """One call per layer per step: write new K/V into the arena, attend over the history."""

    name: str

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: (T, Hq, D); k, v: (T, Hkv, D) of the new tokens. Returns (T, Hq, D), q's dtype:
        `out` if given."""
        ...


def write_kv(arena: KVArena, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter the step's new K/V (T, Hkv, D) into the arena slots of `layer` (quantized arenas:
    each (token, head) row quantized by the arena's format, codes and scales at the same slot)."""
    k_cache, v_cache = arena.layer(layer)
    bs = arena.block_size
    blk = torch.div(slot_mapping, bs, rounding_mode="floor")
    off = slot_mapping % bs
    if not arena.quantized:
        k_cache[blk, :, off] = k.to(k_cache.dtype)  # advanced indices around a slice: (T, Hkv, D)
        v_cache[blk, :, off] = v.to(v_cache.dtype)
        return
    for x, cache, scales in zip((k, v), (k_cache, v_cache), arena.layer_scales(layer), strict=True):
        codes, scale = arena.quant.quantize(x)  # (T, Hkv, code bytes), (T, Hkv, *scale_shape)
        cache[blk, :, off] = codes
        scales[blk, :, off] = scale


def gather_history(arena: KVArena, layer: int, table, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (Hkv, seq_len, D) K and V of one request, read through its block table, in the
    arena's model dtype (quantized arenas: dequantized)."""
    k_cache, v_cache = arena.layer(layer)
    idx = torch.as_tensor(table, dtype=torch.long, device=k_cache.device)
    hkv, d = arena.shape.num_kv_heads, arena.shape.head_dim
    k, v = k_cache[idx], v_cache[idx]  # (n, Hkv, bs, D)
    if arena.quantized:
        k_scales, v_scales = arena.layer_scales(layer)
        k = arena.quant.dequantize(k, k_scales[idx], arena.dtype)
        v = arena.quant.dequantize(v, v_scales[idx], arena.dtype)
    k = k.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :seq_len]
    v = v.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :seq_len]
    return k, v


def reference_attention(
    q: torch.Tensor, k_hist: torch.Tensor, v_hist: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of q (q_len, Hq, D) over dense history (Hkv, S, D); the last q_len
    history positions are the queries' own. Computed in float32 at least; returns (q_len, Hq, D)."""
    q_len, hq, d = q.shape
    hkv, s, _ = k_hist.shape
    group = hq // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).permute(1, 0, 2).reshape(hkv, group * q_len, d)  # (Hkv, G*q_len, D)
    scores = qf @ k_hist.to(acc).transpose(1, 2) * scale  # (Hkv, G*q_len, S)
    q_pos = torch.arange(s - q_len, s, device=q.device).repeat(group)  # (G*q_len,)
    mask = torch.arange(s, device=q.device)[None, :] > q_pos[:, None]
    scores.masked_fill_(mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v_hist.to(acc)  # (Hkv, G*q_len, D)
    return out.reshape(hq, q_len, d).permute(1, 0, 2).to(q.dtype)


class TorchAttention:
    """Reference backend: scatter K/V, then per request gather its blocks and attend densely with
    torch's fused scaled_dot_product_attention (the CPU path; `reference_attention` is the oracle)."""

    name = "torch"

    def __init__(self, arena: KVArena, scale: float) -> None:
        self.arena = arena
        self.scale = scale

    def forward(self, layer, q, k, v, meta: AttnMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        write_kv(self.arena, layer, k, v, meta.slot_mapping)
        out = torch.empty_like(q) if out is None else out
        start = 0
        for q_len, seq_len, table in zip(meta.q_lens_host, meta.seq_lens_host, meta.block_tables_host, strict=True):
            k_hist, v_hist = gather_history(self.arena, layer, table, seq_len)  # (Hkv, S, D)
            qr = q[start : start + q_len].transpose(0, 1)  # (Hq, q_len, D)
            mask = None
            if q_len > 1:  # causal, aligned to the end: query i sees keys <= seq_len - q_len + i
                mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - q_len)
            o = F.scaled_dot_product_attention(qr, k_hist.to(q.dtype), v_hist.to(q.dtype), attn_mask=mask,
                                               scale=self.scale, enable_gqa=True)
            out[start : start + q_len] = o.transpose(0, 1)
            start += q_len
        return out
