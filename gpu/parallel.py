"""Tensor parallelism over torch.distributed: which slice of each weight a rank holds, and the
collectives a rank's forward pass runs (gpu/model.py calls them).

Megatron-style, over `size` ranks:
- q, k and v projections split by heads (the output rows of one head stay together); where there
  are fewer KV heads than ranks, each KV head is replicated on `size / num_kv_heads` ranks, as
  each rank's q heads need theirs;
- gate and up split by rows, so each rank's MLP runs on its slice of the intermediate size;
- the o and down projections split by columns: each rank's product is a partial sum of the
  layer's output, completed by an all-reduce;
- the embedding and the LM head split over the vocabulary: each rank looks up the ids in its
  range (zeros elsewhere) and an all-reduce completes the rows; the logits of all ranks are
  gathered along the vocabulary.

A rank's arena then holds only its own KV heads, and its attention runs on its own q heads.
Norms (and qk-norm weights) are replicated.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpu.model import ModelSpec


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group; `group` None is torch.distributed's default."""

    rank: int
    size: int
    group: Any = None

    def check(self, spec: ModelSpec) -> None:
        """Raise ValueError, naming the shape, where `spec` does not split over `size` ranks."""
        n = self.size
        kv = spec.num_kv_heads
        bad = [f"{name} {value}" for name, value in (("attention heads", spec.num_heads),
                                                      ("intermediate size", spec.intermediate_size),
                                                      ("vocabulary", spec.vocab_size)) if value % n]
        if (kv % n if kv >= n else n % kv):
            bad.append(f"KV heads {kv}")
        if bad:
            raise ValueError(f"tensor parallel size {n} does not divide this model's {', '.join(bad)}")

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shapes one rank computes with (its heads, its slice of the MLP); the vocabulary
        stays whole, since the logits are gathered."""
        self.check(spec)
        n = self.size
        return replace(spec, num_heads=spec.num_heads // n, num_kv_heads=max(1, spec.num_kv_heads // n),
                       intermediate_size=spec.intermediate_size // n)

    def vocab_range(self, spec: ModelSpec) -> tuple[int, int]:
        per = spec.vocab_size // self.size
        return self.rank * per, (self.rank + 1) * per

    def shard(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of a checkpoint's weights (Hugging Face names, whole model `spec`)."""
        self.check(spec)
        n, r, d = self.size, self.rank, spec.head_dim
        q = _part(spec.num_heads * d, n, r)
        if spec.num_kv_heads >= n:
            kv = _part(spec.num_kv_heads * d, n, r)
        else:  # fewer KV heads than ranks: rank r uses the KV head its q heads belong to
            head = r * spec.num_kv_heads // n
            kv = slice(head * d, (head + 1) * d)
        mlp = _part(spec.intermediate_size, n, r)
        vocab = slice(*self.vocab_range(spec))
        out = {}
        for name, w in weights.items():
            short = name.rsplit(".", 2)[-2:]  # ("q_proj", "weight"), ("embed_tokens", "weight") ...
            module = short[0]
            if module == "q_proj":
                w = w[q]
            elif module in ("k_proj", "v_proj"):
                w = w[kv]
            elif module in ("gate_proj", "up_proj"):
                w = w[mlp]
            elif module == "o_proj":
                w = w[:, q]
            elif module == "down_proj":
                w = w[:, mlp]
            elif module in ("embed_tokens", "lm_head"):
                w = w[vocab]
            out[name] = w.contiguous()
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns it."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(S, V / size) on each rank -> (S, V), the ranks' slices in rank order."""
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def _part(length: int, n: int, r: int) -> slice:
    per = length // n
    return slice(r * per, (r + 1) * per)


# --- a group of processes ------------------------------------------------------------------------
# Rank 0 is the engine's own process: its runner broadcasts each step's launch to the other ranks,
# worker processes it starts (`python -m gpu.parallel`, rendezvous by env:// as torchrun's), which
# build their part of the model and arena from what it broadcasts first and run every step it
# sends. Gloo on the CPU.


class Group:
    """Rank 0's handle on its tensor-parallel workers (gloo, this host)."""

    def __init__(self, size: int, threads: int) -> None:
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group")
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(size),
               "STREAMER_TP_PARENT": str(os.getpid()), "STREAMER_TP_THREADS": str(threads)}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.size = size
        self.tp = TensorParallel(0, size)
        self._closing = False
        self.workers = [subprocess.Popen([sys.executable, "-m", "gpu.parallel"], env={**env, "RANK": str(rank)})
                        for rank in range(1, size)]
        threading.Thread(target=self._watch, daemon=True).start()  # from the rendezvous on
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=size,
                                    timeout=timedelta(seconds=RENDEZVOUS_S))
        except Exception:
            self._closing = True
            self._reap()
            raise

    def runner(self, runner, **build) -> RankZeroRunner:
        """Wrap rank 0's ModelRunner; the workers build theirs from `build` (gpu/runner.ModelRunner's
        arguments plus `model`, `dtype` and `seed` for gpu/models.load_model)."""
        data = torch.frombuffer(bytearray(pickle.dumps(build)), dtype=torch.uint8)
        dist.broadcast(torch.tensor([_BUILD, data.numel(), 0, 0, 0], dtype=torch.int64), src=0)
        dist.broadcast(data, src=0)
        return RankZeroRunner(runner, self)

    def close(self) -> None:
        self._closing = True
        if dist.is_initialized():
            try:
                _send_stop()
                dist.barrier()  # every rank is past its last collective before any tears down
            finally:
                dist.destroy_process_group()
        self._reap()

    def _watch(self) -> None:
        """A rank that dies leaves the group unable to compute a step: exit at once (status 1),
        as a crashed engine does, rather than fail every step that follows or hang in one."""
        while not self._closing:
            for rank, p in enumerate(self.workers, start=1):
                if p.poll() is not None and not self._closing:
                    print(f"tensor-parallel rank {rank} exited with status {p.returncode}; stopping",
                          file=sys.stderr, flush=True)
                    os._exit(1)
            time.sleep(0.2)

    def _reap(self) -> None:
        for p in self.workers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class RankZeroRunner:
    """Rank 0's ModelRunner: each launch goes to the other ranks first, then runs here. Everything
    else (collecting ids, timing, deferred sampling) is rank 0's runner's alone."""

    def __init__(self, runner, group: Group) -> None:
        self.runner = runner
        self.group = group

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def launch(self, seqs, swap_out=(), swap_in=(), masks=None):
        _send_step(seqs, swap_out, swap_in)
        return self.runner.launch(seqs, swap_out, swap_in, masks)

    def step(self, seqs):
        return self.runner.collect(self.launch(seqs))

    def close(self) -> None:
        self.group.close()


RENDEZVOUS_S = 120


# Rank 0 talks to the other ranks in pairs of broadcasts: a header of five int64s, then a body.
# Header [n >= 0, token ids, block-table entries, swap-outs, swap-ins]: a step of n sequences,
# its body of int64s: per sequence (start position, token count, table length, samples), the
# token ids, the block tables, the swap pairs. [_BUILD, bytes, ...]: what to build, pickled, in a
# uint8 body (once, first). [_STOP, ...]: no body; every rank meets at a barrier, then leaves.
# The other ranks need no sampling options: their sampled ids go unused, so a sampling sequence
# draws greedily there.
_HEADER, _STOP, _BUILD = 5, -1, -2


def _send_step(seqs, swap_out, swap_in) -> None:
    per, tokens, tables = [], [], []
    for s in seqs:
        assert s.feed < 0, "tensor parallel steps carry their token ids (no overlap)"
        per += (s.start_pos, len(s.token_ids), len(s.block_table), s.sample is not None)
        tokens += s.token_ids
        tables += s.block_table
    swaps = [x for pair in (*swap_out, *swap_in) for x in pair]
    header = torch.tensor([len(seqs), len(tokens), len(tables), len(swap_out), len(swap_in)], dtype=torch.int64)
    dist.broadcast(header, src=0)
    dist.broadcast(torch.tensor(per + tokens + tables + swaps, dtype=torch.int64), src=0)


def _send_stop() -> None:
    dist.broadcast(torch.tensor([_STOP] + [0] * (_HEADER - 1), dtype=torch.int64), src=0)


def _receive() -> tuple:
    """Rank 0's next message: ("step", seqs, swap_out, swap_in), ("build", kwargs) or ("stop",)."""
    from gpu.runner import SeqInput
    from gpu.sampler import SampleSpec

    header = torch.empty(_HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0)
    n, n_tokens, n_tables, n_out, n_in = header.tolist()
    if n == _STOP:
        return ("stop",)
    if n == _BUILD:
        data = torch.empty(n_tokens, dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return ("build", pickle.loads(data.numpy().tobytes()))
    body = torch.empty(4 * n + n_tokens + n_tables + 2 * (n_out + n_in), dtype=torch.int64)
    dist.broadcast(body, src=0)
    values = body.tolist()
    per, rest = values[:4 * n], values[4 * n:]
    tokens, tables, swaps = rest[:n_tokens], rest[n_tokens:n_tokens + n_tables], rest[n_tokens + n_tables:]
    greedy = SampleSpec()
    seqs, t, b = [], 0, 0
    for i in range(n):
        start, length, table, sample = per[4 * i:4 * i + 4]
        seqs.append(SeqInput(tokens[t:t + length], start, tables[b:b + table], greedy if sample else None))
        t, b = t + length, b + table
    pairs = [tuple(swaps[j:j + 2]) for j in range(0, len(swaps), 2)]
    return ("step", seqs, tuple(pairs[:n_out]), tuple(pairs[n_out:]))


def serve_rank() -> None:
    """A worker rank: join the group, build this rank's model part and runner, run every step
    rank 0 sends until it says stop."""
    from gpu.models import load_model
    from gpu.runner import ModelRunner

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _exit_with(int(os.environ["STREAMER_TP_PARENT"]))
    torch.set_num_threads(int(os.environ.get("STREAMER_TP_THREADS", "1")))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size,
                            timeout=timedelta(seconds=RENDEZVOUS_S))
    message = _receive()
    if message[0] == "build":  # (a stop first: rank 0 failed before it could say what to build)
        build = message[1]
        model = load_model(build.pop("model"), "cpu", getattr(torch, build.pop("dtype")), seed=build.pop("seed"),
                           tp=TensorParallel(rank, size)).model
        runner = ModelRunner(model, **build)
        while (message := _receive())[0] == "step":
            runner.collect(runner.launch(*message[1:]))
    dist.barrier()
    dist.destroy_process_group()


def _exit_with(parent: int) -> None:
    """Exit at once when the process that started this rank is gone (it can no longer send)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    serve_rank()
