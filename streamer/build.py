"""Building an engine: device and dtype, how many KV blocks fit, model load, warm-up, and the
auto-tuned step budget. Blocking work; `open_engine` runs it in a worker thread."""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
import torch

from gpu.arena import ArenaShape
from gpu.models import LoadedModel, load_model
from gpu.parallel import Group
from gpu.runner import ModelRunner, SeqInput
from gpu.sampler import SampleSpec
from streamer.config import EngineConfig

CPU_KV_BASE_GIB = 4.0  # on the CPU a fractional --kv-memory is a fraction of this
TUNE_CANDIDATES = (256, 512, 1024, 2048, 4096, 8192)  # step budgets auto-tuning tries
MAX_GRAPH_TOKENS = max(TUNE_CANDIDATES)  # the largest step that runs as CUDA graph pieces; larger ones run eagerly
TUNE_CHUNK = 512  # tokens per synthetic prompt in a tuning step
TUNE_KNEE = 0.9  # keep the smallest budget within this fraction of the best throughput

log = structlog.get_logger("streamer")


def kv_storage_dtype(config: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The arena's storage dtype: the model's (`auto`), int8 or int4."""
    return {"int8": torch.int8, "int4": torch.int4}.get(config.kv_dtype, dtype)


def resolve_device(config: EngineConfig) -> tuple[torch.device, torch.dtype, str]:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    dtype_name = config.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    attention = config.attention or ("cuda" if device.type == "cuda" else "torch")
    if attention == "cuda" and device.type != "cuda":
        raise ValueError("the cuda attention backend needs --device cuda")
    return device, getattr(torch, dtype_name), attention


def kv_blocks(config: EngineConfig, loaded: LoadedModel, device: torch.device, kv_dtype: torch.dtype) -> int:
    """Blocks of the arena: --kv-blocks, or as many as --kv-memory holds at `kv_dtype`'s bytes per
    token (against bf16's 2 * D bytes a row, int8 holds about twice as many: D + 4; int4 about 3.6
    times: D / 2 + D / 16)."""
    s = loaded.model.spec
    if config.kv_blocks is not None:
        return config.kv_blocks
    per_block = ArenaShape(s.num_layers, 1, s.num_kv_heads, config.block_size, s.head_dim).bytes_per_block(kv_dtype)
    if config.kv_memory > 1:
        nbytes = config.kv_memory * 2**30
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = config.kv_memory * free
    else:
        nbytes = config.kv_memory * CPU_KV_BASE_GIB * 2**30
    blocks = int(nbytes // per_block)
    if blocks < 1:
        raise ValueError(f"--kv-memory {config.kv_memory} holds no KV block ({per_block} bytes each)")
    return blocks


def swap_slots(config: EngineConfig, loaded: LoadedModel, device: torch.device, kv_dtype: torch.dtype,
               num_blocks: int) -> int:
    """Blocks of the host swap pool: 0 when preemption is "recompute" (the default off CUDA), else
    as many as --swap-space holds, at most the arena's own count. More
    would be pinned and mostly idle: swapped-out requests come back before anything new is
    admitted, so what they hold stays about what the arena held (a victim that finds no room left
    is recomputed)."""
    mode = config.preemption or ("swap" if device.type == "cuda" else "recompute")
    if mode != "swap":
        return 0
    s = loaded.model.spec
    per_block = ArenaShape(s.num_layers, 1, s.num_kv_heads, config.block_size, s.head_dim).bytes_per_block(kv_dtype)
    slots = min(num_blocks, int(config.swap_space * 2**30 // per_block))
    if slots < 1:
        raise ValueError(f"--swap-space {config.swap_space} holds no KV block ({per_block} bytes each)")
    return slots


def running_limit(config: EngineConfig, num_blocks: int) -> int:
    """--max-running, or as many requests as the arena holds at a 1k-token context, between 8 and
    256: more running than the arena holds only preempts, and 256 is the offline bench's batch
    (docs/BENCHMARKS.md, "Online against offline", has the default against it)."""
    if config.max_running is not None:
        return config.max_running
    return max(8, min(256, num_blocks * config.block_size // 1024))


def load_runner(config: EngineConfig) -> tuple[LoadedModel, ModelRunner, int, int]:
    """Load the model, size the KV arena and the swap pool, build and warm the runner: (model,
    runner, KV blocks, most requests in a step)."""
    device, dtype, attention = resolve_device(config)
    group = start_tensor_parallel(config, device)
    try:
        return _load_runner(config, device, dtype, attention, group)
    except BaseException:
        if group is not None:
            group.close()
        raise


def start_tensor_parallel(config: EngineConfig, device: torch.device) -> Group | None:
    """With --tensor-parallel-size N > 1, start the N - 1 other ranks (this process is rank 0)."""
    n = config.tensor_parallel_size
    if n == 1:
        return None
    if device.type != "cpu":
        raise ValueError("--tensor-parallel-size runs over gloo on the CPU so far; on CUDA it needs NCCL and "
                         "graphs that capture its all-reduces, not built yet")
    threads = max(1, torch.get_num_threads() // n)  # the ranks share this process's CPU threads
    torch.set_num_threads(threads)
    return Group(n, threads=threads)


def _load_runner(config: EngineConfig, device: torch.device, dtype: torch.dtype, attention: str,
                 group: Group | None) -> tuple[LoadedModel, ModelRunner, int, int]:
    loaded = load_model(config.model, device, dtype, seed=config.seed, tp=group.tp if group else None)
    kv_dtype = kv_storage_dtype(config, dtype)
    num_blocks = kv_blocks(config, loaded, device, kv_dtype)
    max_running = running_limit(config, num_blocks)
    graphs = config.cuda_graphs and device.type == "cuda" and attention == "cuda"
    pieces = graphs and config.mixed_graphs
    slots = swap_slots(config, loaded, device, kv_dtype, num_blocks)
    runner = ModelRunner(loaded.model, num_blocks, config.block_size, attention,
                         graph_batch=min(max_running, 512) if graphs else 0, kv_dtype=kv_dtype, swap_slots=slots,
                         graph_tokens=min(config.max_batch_tokens or MAX_GRAPH_TOKENS, MAX_GRAPH_TOKENS) if pieces else 0)
    if group is not None:  # the other ranks build theirs alike: the same blocks, their own heads
        runner = group.runner(runner, model=config.model, dtype=str(dtype).removeprefix("torch."), seed=config.seed,
                              num_blocks=num_blocks, block_size=config.block_size, attention=attention,
                              kv_dtype=kv_dtype, swap_slots=slots)
    warmup(runner, scratch_block=num_blocks)
    return loaded, runner, num_blocks, max_running


def warmup(runner: ModelRunner, scratch_block: int) -> None:
    """One tiny step (in the scratch block no request owns) so kernels are compiled and memory
    pools exist before the first request."""
    runner.step([SeqInput([0], 0, [scratch_block], SampleSpec())])
    if hasattr(runner.backend, "warmup"):
        runner.backend.warmup()


@dataclass(frozen=True)
class TuneResult:
    budget: int
    tok_s: dict[int, float]  # tokens per second each candidate budget reached


def tune_budget(config: EngineConfig, loaded: LoadedModel, runner: ModelRunner, num_blocks: int) -> TuneResult | None:
    """Auto-tuning, when it applies: not with an explicit --max-batch-tokens; by default only on CUDA."""
    enabled = config.auto_tune if config.auto_tune is not None else runner.device.type == "cuda"
    if config.max_batch_tokens is not None or not enabled:
        return None
    result = auto_tune(runner, num_blocks, config.block_size, loaded.model.spec.max_position)
    if result is not None:
        log.info("auto_tuned_budget", max_batch_tokens=result.budget,
                 tok_s={str(b): round(v) for b, v in result.tok_s.items()})
    return result


def auto_tune(runner: ModelRunner, num_blocks: int, block_size: int, max_position: int,
              candidates: tuple[int, ...] = TUNE_CANDIDATES, repeats: int = 3) -> TuneResult | None:
    """Time one full step per candidate budget and keep the smallest whose tokens/s is within
    TUNE_KNEE of the best: past that knee a bigger step only lengthens every step (and so ITL and
    TTFT) for no throughput. A step is prompt chunks of TUNE_CHUNK tokens written into blocks
    0.. of the arena before any request exists (the allocator is built afterwards, with every block
    free); a candidate whose step does not fit the arena is skipped. None if none fits."""
    chunk = min(TUNE_CHUNK, max_position)
    tok_s: dict[int, float] = {}
    for budget in candidates:
        inputs, next_block = [], 0
        for start in range(0, budget, chunk):
            length = min(chunk, budget - start)
            blocks = -(-length // block_size)
            inputs.append(SeqInput([1] * length, 0, list(range(next_block, next_block + blocks)), SampleSpec()))
            next_block += blocks
        if next_block > num_blocks:
            continue
        runner.step(inputs)  # the first step of a shape allocates; not timed
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.step(inputs)  # returns host ints: the device has finished
            best = min(best, time.perf_counter() - t0)
        tok_s[budget] = budget / best
    if not tok_s:
        return None
    top = max(tok_s.values())
    return TuneResult(min(b for b, v in tok_s.items() if v >= TUNE_KNEE * top), tok_s)
