"""How our CuPy kernels are launched: on torch's current CUDA stream (so they order with torch's
ops, and inside a CUDA-graph capture they are captured with them), with tensors passed as raw
device pointers. Owns the CuPy handles of those streams.

`torch.cuda.current_stream()` costs ~25 us of Python a call on our GPU hosts (device-index
normalisation and a Stream object), and an eager step launches ~120 CuPy kernels, so this reads
the raw stream pointer through `torch._C._cuda_getCurrentRawStream`, the call that
`current_stream()` wraps (also how Triton finds torch's stream).
"""

from __future__ import annotations

import numpy as np
import torch

_STREAMS: dict[int, object] = {}  # raw stream pointer -> cupy.cuda.ExternalStream


def current(device_index: int):
    """CuPy's handle on torch's current stream of the device, to launch under (`with current(i):`)."""
    ptr = torch._C._cuda_getCurrentRawStream(device_index)
    stream = _STREAMS.get(ptr)
    if stream is None:
        import cupy

        stream = _STREAMS[ptr] = cupy.cuda.ExternalStream(ptr)
    return stream


def ptr(t: torch.Tensor | None) -> np.uint64:
    """A tensor's device address as a kernel argument; 0 (a null pointer) for None."""
    return np.uint64(0 if t is None else t.data_ptr())
