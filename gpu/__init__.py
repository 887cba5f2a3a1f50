"""GPU-side half of Streamer: models, the KV arena, attention backends and the model runner.

Nothing here imports `streamer` or `web`; everything works on the CPU too, and CUDA-only code
(CuPy kernels) is imported lazily.
"""
