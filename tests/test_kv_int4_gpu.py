"""int4 KV on the GPU: the kernel tests of tests/test_attention_gpu.py run over int4 arenas (random
codes and float16 group scales), then the end-to-end checks of tests/test_kv_int8_gpu.py.

The reference dequantizes the same codes in float64, so the kernel is held to the 16-bit bounds of
test_attention_gpu.py: its only extra rounding is the dequantized value (code * scale, float32) to
16 bits before the mma, as for int8. Its fused write must equal torch's quantization bit for bit
(codes and scales). Needs CUDA and CuPy (skipped otherwise).
"""

from __future__ import annotations

import pytest
import torch

from gpu.arena import KVArena
from tests import test_attention_gpu as kernel
from tests.test_kv_int8_gpu import compare_logprobs, serve_against_auto

pytestmark = kernel.pytestmark
_plain_arena = kernel._arena


def _arena(dtype, head_dim, block_size, hkv, seq_lens, num_layers=1, spare=0, kv="auto"):
    """test_attention_gpu's arena, int4 when asked (its shape and block tables, in place of its
    16-bit contents): random bytes of codes, group scales for |x| <= 3."""
    plain, tables = _plain_arena(dtype, head_dim, block_size, hkv, seq_lens, num_layers, spare,
                                 "auto" if kv == "int4" else kv)
    if kv != "int4":
        return plain, tables
    arena = KVArena(plain.shape, dtype, "cuda", torch.int4)
    arena.kv.random_(0, 256)  # zeros would hide wrong indexing
    arena.scales.uniform_(0.2 / 7, 3 / 7)
    return arena, tables


@pytest.fixture(autouse=True)
def int4_arenas(monkeypatch):
    monkeypatch.setattr(kernel, "_arena", _arena)


@pytest.mark.parametrize("case", list(kernel.CASES))
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", list(kernel.DTYPES))
def test_matches_reference(dtype, head_dim, block_size, case):
    if block_size == 256 and (dtype, head_dim) != ("bf16", 128):
        pytest.skip("block size 256: one specialisation is enough here")
    kernel.test_matches_reference(dtype, head_dim, block_size, case, "int4")


@pytest.mark.parametrize("case", list(kernel.ROPE_CASES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", list(kernel.DTYPES))
def test_fused_rope_is_bit_for_bit_rotating_first(dtype, head_dim, case):
    kernel.test_fused_rope_is_bit_for_bit_rotating_first(dtype, head_dim, case, "int4")


@pytest.mark.parametrize("group", [1, 7, 32])
@pytest.mark.parametrize("case", ["decode", "mixed", "short_chunks"])
def test_gqa_ratios(group, case):
    kernel.test_gqa_ratios(group, case, "int4")


def test_small_mixed_for_sanitizer():
    kernel.test_small_mixed_for_sanitizer("int4")


@pytest.mark.parametrize("d", [64, 128])
def test_chunked_prefill_then_decode_steps(d):
    kernel.test_chunked_prefill_then_decode_steps(d, "int4")


@pytest.mark.parametrize("d", [64, 128])
def test_cuda_graph_capture_and_replay(d):
    kernel.test_cuda_graph_capture_and_replay(d, "int4")


@pytest.mark.filterwarnings("ignore:.*Profiler clears events")
def test_one_launch_per_layer_per_step():
    kernel.test_one_launch_per_layer_per_step("int4")


def test_int4_kernel_logprobs_match_the_int4_torch_backend():
    """300 teacher-forced tokens on random qwen2.5-0.5b weights. Unlike int8, the two paths need
    not see the same codes: their K/V differ in the last bits (fused ops against torch ops), and a
    value that close to a rounding boundary moves a whole int4 step. So a looser bound than int8's,
    fitted to 20 draws on an H200: means 0.10-0.17, worsts 0.43-1.05."""
    mean, worst = compare_logprobs("int4")
    assert mean < 0.25 and worst < 2.0


async def test_engine_with_int4_kv_and_cuda_graphs_serves_and_frees_every_block():
    """Same --kv-memory: the int4 arena has (2 * 64) / (32 + 4) = 3.56x the blocks."""
    await serve_against_auto("int4", 32 + 4)
