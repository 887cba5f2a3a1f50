"""One rank of tests/test_tensor_parallel.py: a process of a gloo group that loads its part of a
random model and runs the shared greedy script, writing its tokens (rank 0) as JSON.

    python tests/tp_rank.py MODEL RANK WORLD RENDEZVOUS_FILE OUT_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu.models import load_model  # noqa: E402
from gpu.parallel import TensorParallel  # noqa: E402
from tests.tp_script import greedy_script  # noqa: E402


def main() -> None:
    model, rank, world, rendezvous, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        loaded = load_model(f"random:{model}", "cpu", torch.float32, tp=TensorParallel(rank, world))
        tokens = greedy_script(loaded.model)
        if rank == 0:
            Path(out).write_text(json.dumps(tokens))
        dist.barrier()  # both past their last collective before either tears down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
