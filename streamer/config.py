"""Engine configuration: one frozen dataclass, validated on construction; argparse lives in __main__."""

from __future__ import annotations

from dataclasses import dataclass

KV_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"  # "smollm2", a local HF folder, or "random:NAME"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str | None = None  # None: cuda if available, else cpu
    attention: str | None = None  # None: "cuda" kernel on CUDA, "torch" reference on CPU
    kv_memory: float = 0.5  # GiB if > 1, else the fraction of free device memory (CPU: of 4 GiB)
    kv_blocks: int | None = None  # exact number of KV blocks; overrides kv_memory when set
    kv_dtype: str = "auto"  # KV storage: "auto" (the model's dtype) or "int8" (per-token, per-head scales)
    block_size: int = 16
    max_batch_tokens: int = 512  # token budget of one step
    max_running: int = 64  # cap on sequences in one step
    max_waiting: int = 1024  # bounded inbox + waiting queue; beyond it submit() says "overloaded"
    max_buffered_events: int = 1024  # per request; a client further behind is aborted ("slow_consumer")
    seed: int = 0  # seed of random:NAME weights
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix seen before
    cuda_graphs: bool = True  # decode steps replayed as CUDA graphs (CUDA only)
    static_batch: int | None = None  # benchmark baseline: static batches of this size, no continuous batching

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
        if self.max_batch_tokens < 1 or self.max_running < 1 or self.max_waiting < 1:
            raise ValueError("max_batch_tokens, max_running and max_waiting must be >= 1")
        if self.max_buffered_events < 2:
            raise ValueError("max_buffered_events must be >= 2")
