"""CUDA attention backend: one CuPy RawKernel launch per layer per step over the KV arena.

Owns the loader of gpu/csrc/paged_attention.cu (compiled per dtype, KV storage (16-bit, int8 or
int4), head_dim and block size, cached, compiled in `warmup()`) and the launch wrapper. CuPy is
imported lazily so CPU-only CI can import this.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from gpu import cupy_launch
from gpu.arena import INT4, KVArena
from gpu.attention import AttnMetadata

_SRC = Path(__file__).parent / "csrc" / "paged_attention.cu"
_THREADS = 128
_WS_ROWS = 1 << 16  # partial-output rows of the flash-decoding workspace (32 MiB at D=128)
_MAX_COUNTERS = 1 << 13  # (q tile, kv head) pairs that may split in one launch
_M64_MIN_BLOCKS = 3  # resident m64 blocks per SM the compiler must allow (tuning knob, see bench)
_M16_STAGES = {64: 2, 128: 3}  # cp.async stages of the decode kernel per head_dim (tuning knob)
# (cc, bf16, kv bits, head_dim, block_size, m64 min blocks, m16 stages) -> {variant: (RawKernel, blocks/SM)}
_MODULES: dict[tuple, dict[str, tuple[object, int]]] = {}


_BN = 64  # key positions per tile (BN in the .cu)


def _smem_bytes(variant: str, head_dim: int, kv_bits: int = 16) -> int:
    """Dynamic shared memory: STAGES x (K and V 16-bit tiles); Q lives in registers. Quantized KV
    (8 or 4 bits): STAGES x (K and V tiles of codes) plus one dequantized 16-bit K and V tile.
    Mirrors SMEM in the .cu."""
    stages = 2 if variant == "m64" else _M16_STAGES[head_dim]
    if kv_bits != 16:
        return 2 * _BN * head_dim * 2 + stages * 2 * _BN * head_dim * kv_bits // 8
    return stages * 2 * _BN * head_dim * 2


def _kernels(
    dtype: torch.dtype, head_dim: int, block_size: int, device: torch.device, kv_bits: int = 16
) -> dict[str, tuple]:
    """Compile once per process and specialisation; {"m64"|"m16": (kernel, resident blocks per SM)}."""
    import cupy

    major, minor = torch.cuda.get_device_capability(device)
    key = (
        major * 10 + minor,
        dtype == torch.bfloat16,
        kv_bits,
        head_dim,
        block_size,
        _M64_MIN_BLOCKS,
        _M16_STAGES[head_dim],
    )
    if key in _MODULES:
        return _MODULES[key]
    options = (
        "-std=c++17",
        f"--gpu-architecture=sm_{key[0]}",
        f"-DATTN_BF16={int(key[1])}",
        f"-DKV_BITS={kv_bits}",
        f"-DKV4_GROUP={INT4.group}",
        f"-DHEAD_DIM={head_dim}",
        f"-DBLOCK_SIZE={block_size}",
        f"-DM64_MIN_BLOCKS={_M64_MIN_BLOCKS}",
        f"-DM16_STAGES={_M16_STAGES[head_dim]}",
    )
    code = _SRC.read_text()
    try:
        kernels = _load(cupy.RawModule(code=code, options=options), head_dim, kv_bits)
    except cupy.cuda.compiler.CompileException as exc:  # NVRTC without some builtin: try nvcc
        warnings.warn(f"NVRTC failed on paged_attention.cu, retrying with nvcc: {exc}", stacklevel=2)
        kernels = _load(cupy.RawModule(code=code, options=options, backend="nvcc"), head_dim, kv_bits)
    _MODULES[key] = kernels
    return kernels


def _load(module, head_dim: int, kv_bits: int) -> dict[str, tuple]:
    import cupy

    kernels = {}
    for variant in ("m64", "m16"):
        kern = module.get_function(f"paged_attention_{variant}")
        smem = _smem_bytes(variant, head_dim, kv_bits)
        kern.max_dynamic_shared_size_bytes = smem  # loads the module: compiles now
        try:
            resident = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                kern.kernel.ptr, _THREADS, smem
            )
        except Exception as exc:  # only the split heuristic needs it
            warnings.warn(f"occupancy query failed ({exc}); assuming 2 blocks per SM", stacklevel=2)
            resident = 2
        kernels[variant] = (kern, max(1, int(resident)))
    return kernels


def _num_splits(blocks: int, slots: int, max_splits: int) -> int:
    """Fewest KV splits whose grid fills its last wave of `slots` resident blocks >= 90% as well as the
    best split count would: a grid of 1.3 waves runs its tail on a third of the GPU."""
    if blocks >= 4 * slots or max_splits <= 1:
        return 1

    def fill(s: int) -> float:
        n = blocks * s
        return n / (slots * math.ceil(n / slots))

    best = max(fill(s) for s in range(1, max_splits + 1))
    return next(s for s in range(1, max_splits + 1) if fill(s) >= 0.9 * best)


class CudaAttention:
    """Paged flash attention on CUDA; see docs/ATTENTION.md for the kernel design."""

    name = "cuda"

    def __init__(self, arena: KVArena, scale: float) -> None:
        assert arena.kv.is_cuda, "CudaAttention needs the arena on a CUDA device"
        assert arena.dtype in (torch.float16, torch.bfloat16), arena.dtype
        assert arena.kv_dtype == arena.dtype or arena.quant is not None, arena.kv_dtype
        assert arena.shape.head_dim in (64, 128), arena.shape.head_dim
        self.arena = arena
        self.scale = scale
        self.launches = 0  # attention kernel launches so far (tests prove one per layer per step)
        dev = arena.kv.device
        self._device = dev
        self._num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        d = arena.shape.head_dim
        # Flash-decoding scratch, allocated once: partial (o, m, l) per split, and arrival counters that
        # the kernel's last split block re-arms to zero (so CUDA-graph replays need no memset).
        self._ws_o = torch.empty(_WS_ROWS * d, dtype=torch.float32, device=dev)
        self._ws_ml = torch.empty(_WS_ROWS * 2, dtype=torch.float32, device=dev)
        self._counters = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=dev)
        self._plan_meta: tuple | None = None  # (meta, num_q_heads, plan) of the last step
        # Each layer's arena pointers (k, v, and the scales or null), and the launch of the last
        # step's layers, which differ only in those: (meta, key, kernel, grid, smem, args before,
        # args after). A step's launches then build no arguments but the layer's.
        quant = arena.quantized
        self._layer_ptrs = [tuple(cupy_launch.ptr(x) for x in (*arena.layer(i), *(arena.layer_scales(i) if quant else (None, None))))
                            for i in range(arena.shape.num_layers)]
        self._step_launch: tuple | None = None

    def warmup(self) -> None:
        """Compile this arena's specialisation now, so no request waits on NVRTC."""
        self._kernels()

    def _kernels(self) -> dict[str, tuple]:
        s = self.arena.shape
        return _kernels(self.arena.dtype, s.head_dim, s.block_size, self._device, self._kv_bits)

    @property
    def _kv_bits(self) -> int:
        return self.arena.quant.bits if self.arena.quant else 16

    def launch_plan(self, meta: AttnMetadata, num_q_heads: int) -> tuple[str, int, int, int, bool]:
        """(variant, tokens per q tile, grid x, kv splits, one q tile per request) for this step;
        computed once per step."""
        if self._plan_meta is not None and self._plan_meta[0] is meta and self._plan_meta[1] == num_q_heads:
            return self._plan_meta[2]
        hkv = self.arena.shape.num_kv_heads
        group = num_q_heads // hkv
        variant, bm = ("m16", 16) if meta.max_q_len * group <= 16 else ("m64", 64)
        tq = bm // group
        # One q tile per request when every request's new tokens fit one (decode): tile r is request
        # r. Else a bound on the q tiles, laid out per request; the kernel skips the spare ones.
        one_tile = meta.max_q_len <= tq
        grid_x = meta.num_seqs if one_tile else meta.num_tokens // tq + meta.num_seqs
        blocks = hkv * sum(-(-q // tq) for q in meta.q_lens_host)
        resident = self._kernels()[variant][1]
        # Split the key range (flash-decoding) when the grid is a few waves or less: each split keeps
        # >= 4 key tiles, and the workspace and counters bound the count.
        tiles = math.ceil(meta.max_seq_len / _BN)
        max_splits = min(64, tiles // 4, _WS_ROWS // (grid_x * hkv * bm))
        if grid_x * hkv > _MAX_COUNTERS:
            max_splits = 1
        splits = _num_splits(blocks, resident * self._num_sms, max_splits)
        plan = (variant, tq, grid_x, splits, one_tile)
        self._plan_meta = (meta, num_q_heads, plan)
        return plan

    def fuses_rope(self, meta: AttnMetadata, num_q_heads: int) -> bool:
        """Whether this step's launch can apply RoPE itself (forward_qkv): decode-shaped steps (the
        m16 variant, one q tile per request), where each block rotates its own request's few new
        keys. In a prefill launch every q tile of a prompt would rotate all of the prompt's keys
        again, so those steps rotate once beforehand (CudaOps.split_rope) and call forward."""
        return self.launch_plan(meta, num_q_heads)[0] == "m16"

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttnMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: (T, Hq, D); k, v: (T, Hkv, D), already rotated. Writes k, v at meta.slot_mapping of
        `layer`, returns (T, Hq, D).

        `out`, if given, receives the result (tests poison it first). No host sync, no allocation
        besides `out`: capturable in a CUDA graph."""
        t, hq, d = q.shape
        hkv = self.arena.shape.num_kv_heads
        assert d == self.arena.shape.head_dim, (q.shape, self.arena.shape.head_dim)
        assert k.shape == v.shape == (t, hkv, d), (k.shape, v.shape)
        for x in (q, k, v):
            assert x.is_contiguous() and x.data_ptr() % 16 == 0 and x.device == self._device
        return self._launch(layer, q, k, v, hq * d, hkv * d, None, t, hq, meta, out)

    def forward_qkv(
        self,
        layer: int,
        qkv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        num_q_heads: int,
        meta: AttnMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same attention straight from the QKV projection's output, qkv: (T, (Hq + 2 Hkv) D),
        not yet rotated. The kernel applies RoPE from `rope` (cos, sin: float32 (max_position, D), the
        model's tables; a token's position is its index in its sequence) as it reads q and the new
        keys, so no separate RoPE kernel runs and q, k, v are never copied out. The arena and the
        result are bit for bit those of `forward` on q, k, v rotated in qkv's dtype."""
        s = self.arena.shape
        t, width = qkv.shape
        d, hkv = s.head_dim, s.num_kv_heads
        assert width == (num_q_heads + 2 * hkv) * d, (qkv.shape, num_q_heads, hkv, d)
        assert qkv.is_contiguous() and qkv.data_ptr() % 16 == 0 and qkv.device == self._device
        cos, sin = rope
        assert cos.shape == sin.shape and cos.shape[1] == d and cos.dtype == sin.dtype == torch.float32
        assert cos.is_contiguous() and sin.is_contiguous() and cos.device == sin.device == self._device
        assert meta.max_seq_len <= cos.shape[0], (meta.max_seq_len, cos.shape)
        assert self.fuses_rope(meta, num_q_heads), "forward_qkv serves decode-shaped steps only (fuses_rope)"
        q_size, kv_size = num_q_heads * d, hkv * d
        q, k, v = (qkv[:, :q_size], qkv[:, q_size:q_size + kv_size], qkv[:, q_size + kv_size:])
        return self._launch(layer, q, k, v, width, width, rope, t, num_q_heads, meta, out)

    def _launch(self, layer, q, k, v, q_stride: int, kv_stride: int, rope, t: int, hq: int, meta, out):
        s = self.arena.shape
        d, hkv = s.head_dim, s.num_kv_heads
        assert hq % hkv == 0 and hq // hkv <= 64, (hq, hkv)
        assert q.dtype == k.dtype == v.dtype == self.arena.dtype, (q.dtype, k.dtype, self.arena.dtype)
        assert t == meta.num_tokens and 0 <= layer < s.num_layers
        assert meta.slot_mapping.dtype == torch.int64 and meta.cu_seqlens_q.dtype == torch.int32
        if out is None:
            out = torch.empty(t, hq, d, dtype=q.dtype, device=self._device)
        assert out.shape == (t, hq, d) and out.dtype == q.dtype and out.is_contiguous()

        key = (hq, q_stride, kv_stride, *(x.data_ptr() for x in (out, q, k, v, *(rope or ()))))
        step = self._step_launch
        if step is None or step[0] is not meta or step[1] != key:
            step = self._step_launch = (meta, key, *self._step_args(meta, out, q, k, v, q_stride, kv_stride, rope, hq))
        _, _, kern, grid, smem, before, after = step
        args = before + self._layer_ptrs[layer] + after
        with cupy_launch.current(self._device.index):  # torch's current stream (also the capture stream in a graph)
            kern(grid, (_THREADS, 1, 1), args, shared_mem=smem)
        self.launches += 1
        return out

    def _step_args(self, meta, out, q, k, v, q_stride: int, kv_stride: int, rope, hq: int) -> tuple:
        """(kernel, grid, shared memory, the arguments before the layer's arena pointers, those
        after) of a step's launches: the same for every layer."""
        s = self.arena.shape
        variant, tq, grid_x, splits, one_tile = self.launch_plan(meta, hq)
        cos, sin = rope or (None, None)
        ptr = cupy_launch.ptr
        before = tuple(ptr(x) for x in (out, q, k, v))
        after = (
            *(ptr(x) for x in (meta.cu_seqlens_q, meta.seq_lens, meta.cu_blocks)),
            *(ptr(x) for x in (meta.block_tables, meta.slot_mapping)),
            *(ptr(x) for x in (self._ws_o, self._ws_ml, self._counters, cos, sin)),
            np.int32(q_stride),
            np.int32(kv_stride),
            np.int32(meta.num_seqs),
            np.int32(hq),
            np.int32(s.num_kv_heads),
            np.float32(self.scale * math.log2(math.e)),
            np.int32(one_tile),
        )
        smem = _smem_bytes(variant, s.head_dim, self._kv_bits)
        return self._kernels()[variant][0], (grid_x, s.num_kv_heads, splits), smem, before, after

