"""Engine configuration: one frozen dataclass, validated on construction; argparse lives in __main__."""

from __future__ import annotations

from dataclasses import dataclass

from streamer.policy import Policy

DEFAULT_BATCH_TOKENS = 512  # the step budget when neither --max-batch-tokens nor auto-tuning sets one
KV_DTYPES = ("auto", "int8", "int4")
PREEMPTIONS = (None, "swap", "recompute")
LAUNCHES = (None, "inline", "thread")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start; argparse in __main__ fills it from flags of the same names.

    How a request preempted for memory resumes (`preemption`; None is swap on CUDA, recompute
    elsewhere, see below):

    - `"swap"`: its computed KV blocks are copied to a host pool of `swap_space` GiB (pinned on
      CUDA), its device blocks freed, and when it is admitted again the blocks come back into
      fresh device blocks and it continues where it stopped, nothing recomputed. Swapping costs
      1-10% of recomputing on an H100 (docs/BENCHMARKS.md, "Preemption: swap or recompute"), so
      it is the default on CUDA (tests/test_swap_gpu.py; on the CPU its outputs equal recompute's
      token for token). A victim whose blocks do not fit the pool's free slots is recomputed.
      The pool holds at most as many blocks as the arena (streamer/build.py, `swap_slots`).
    - `"recompute"`: its blocks are freed and computed again from prompt + generated tokens when
      it resumes; with prefix caching its full blocks stay cached, so it takes back those not
      evicted meanwhile. The default off CUDA (on the CPU the "device" arena is host memory
      already, so a swap pool is RAM better given to the arena itself).
    """

    model: str = "smollm2"  # "smollm2", a local HF folder, or "random:NAME"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str | None = None  # None: cuda if available, else cpu
    attention: str | None = None  # None: "cuda" kernel on CUDA, "torch" reference on CPU
    kv_memory: float = 0.5  # GiB if > 1, else the fraction of free device memory (CPU: of 4 GiB)
    kv_blocks: int | None = None  # exact number of KV blocks; overrides kv_memory when set
    kv_dtype: str = "auto"  # KV storage: "auto" (the model's dtype), "int8" or "int4" (gpu/arena.py, KVQuant)
    block_size: int = 16
    max_batch_tokens: int | None = None  # token budget of one step; None: auto-tuned, else DEFAULT_BATCH_TOKENS
    max_running: int | None = None  # cap on sequences in one step; None: from the KV arena (streamer/build.py)
    max_waiting: int = 1024  # bounded inbox + waiting queue; beyond it submit() says "overloaded"
    max_buffered_events: int = 1024  # per request; a client further behind is aborted ("slow_consumer")
    seed: int = 0  # seed of random:NAME weights
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix seen before
    cuda_graphs: bool = True  # decode steps replayed as CUDA graphs (CUDA only)
    mixed_graphs: bool = True  # other steps as CUDA graph pieces between attention launches (CUDA only)
    # Plan and launch step N+1 before step N's ids are back, so the device need not wait on the
    # host. None: on for CUDA; off on the CPU, where a launch computes the step before it returns,
    # so overlapping would only hold each token back a step.
    overlap: bool | None = None
    # How a step is launched and waited for. "inline": on the step loop's own thread, polling for
    # the ids between the other tasks' turns (on CUDA a launch only queues work); "thread": launch
    # and wait in a worker thread (on the CPU a launch computes the step). None: by the device.
    launch: str | None = None
    static_batch: int | None = None  # benchmark baseline: static batches of this size, no continuous batching
    static_padding: bool = False  # ... padded too: prompts to the batch's longest, rows held to its end
    auto_tune: bool | None = None  # time candidate budgets at warm-up; None: on for CUDA, off on the CPU
    slo_ttft_ms: float | None = None  # latency objectives: set, the controller steers budget and admission
    slo_itl_ms: float | None = None
    policy: str = "fcfs"  # "fcfs", or a comma-separated set of priority, first-token, length, fair (streamer/policy.py)
    prefill_share: float = 0.25  # first-token: share of each step's budget kept for pending prefills
    aging_s: float = 10.0  # priority: seconds of waiting worth one class; length: end of the length penalty
    preemption: str | None = None  # "swap" or "recompute"; None: swap on CUDA, else recompute
    swap_space: float = 4.0  # GiB of host memory for swapped-out KV blocks (used by preemption "swap")
    tensor_parallel_size: int = 1  # ranks the model is split over (gpu/parallel.py): processes, gloo on the CPU

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be given")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.attention not in (None, "torch", "cuda"):
            raise ValueError(f"attention must be 'torch' or 'cuda', got {self.attention!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if not self.kv_memory > 0:
            raise ValueError("kv_memory must be > 0")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError("kv_blocks must be >= 1")
        if self.block_size not in (8, 16, 32, 64, 128, 256):
            raise ValueError("block_size must be one of 8, 16, 32, 64, 128, 256")
        if self.static_batch is not None and self.static_batch < 1:
            raise ValueError("static_batch must be >= 1")
        if self.static_padding and not self.static_batch:
            raise ValueError("static_padding pads static batches: set static_batch too")
        if (self.max_batch_tokens is not None and self.max_batch_tokens < 1) or (self.max_running or 1) < 1 \
                or self.max_waiting < 1:
            raise ValueError("max_batch_tokens, max_running and max_waiting must be >= 1")
        for name in ("slo_ttft_ms", "slo_itl_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0")
        Policy.parse(self.policy, self.prefill_share, self.aging_s)  # raises ValueError with the reason
        if self.static_batch is not None and self.policy != "fcfs":
            raise ValueError("static_batch is the FIFO baseline; it takes no --policy")
        if self.launch not in LAUNCHES:
            raise ValueError(f"launch must be 'inline' or 'thread', got {self.launch!r}")
        if self.preemption not in PREEMPTIONS:
            raise ValueError(f"preemption must be 'swap' or 'recompute', got {self.preemption!r}")
        if not self.swap_space >= 0:
            raise ValueError("swap_space must be >= 0 GiB")
        if self.preemption == "swap" and self.swap_space == 0:
            raise ValueError("preemption 'swap' needs swap_space > 0")
        if self.max_buffered_events < 2:
            raise ValueError("max_buffered_events must be >= 2")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.tensor_parallel_size > 1 and self.overlap:
            raise ValueError("tensor parallelism runs steps without overlap: each step's ids go to every rank")
