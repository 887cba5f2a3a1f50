"""CUDA graphs of mixed steps (prefill chunks with or without decodes), in pieces between the
attention launches: one set of pieces per token-count bucket, captured at warm-up.

Owned by the model runner. An eager mixed step launches ~200 kernels from Python, several
milliseconds of host time that hold the step loop (and with it the event loop). Everything in a
layer but attention depends only on the step's token count, so a step of t tokens runs as the
pieces of the smallest bucket >= t, replayed in order:

    piece 0      embedding, layer 0's norm, QKV projection, split + RoPE  -> static q, k, v
    attention 0  eager, over the step's own metadata, into the static attention output
    piece i      layer i-1's o projection and MLP, layer i's norm, QKV, split + RoPE
    ...
    piece L      layer L-1's o projection and MLP
    head         eager: the sampling rows' final norm and LM head

Rows t..bucket-1 are padding: the pieces compute them (every op is row-wise) but attention never
sees them, so they write no KV and no real row reads them. Attention stays outside the graphs
because its launch shape and metadata belong to each step. The pieces of all buckets share one
memory pool: they are replayed in the order they were captured, one step at a time, so a later
piece may reuse what an earlier one no longer needs.
"""

from __future__ import annotations

import torch

from gpu.graphs import collector_paused

# Token-count buckets: ~1.25x apart above 256, so padding costs at most a quarter of a step's GEMMs.
BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072,
           4096, 5120, 6144, 8192)


class PiecewiseGraphs:
    def __init__(self, model, backend, ops, max_tokens: int, capture: bool = True) -> None:
        self.model, self.backend, self.ops = model, backend, ops
        self.buckets = [b for b in BUCKETS if b < max_tokens] + [max_tokens]
        self.tmax = tmax = max_tokens
        s, dev = model.spec, model.device
        self.num_layers = s.num_layers
        self.ids = torch.zeros(tmax, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(tmax, dtype=torch.int64, device=dev)
        self.q = torch.zeros(tmax, s.num_heads, s.head_dim, dtype=model.dtype, device=dev)
        self.k = torch.zeros(tmax, s.num_kv_heads, s.head_dim, dtype=model.dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.attn = torch.zeros_like(self.q)  # attention's output, the next piece's input
        # bucket -> (its pieces, the last piece's (x, delta, rope): the head reads x and delta)
        self.graphs: dict[int, tuple[list[torch.cuda.CUDAGraph], tuple]] = {}
        if capture:
            with collector_paused():
                self._capture()

    def bucket(self, t: int) -> int | None:
        return next((b for b in self.buckets if b >= t), None)

    def _piece(self, b: int, i: int, state: tuple | None) -> tuple:
        """Piece i of bucket b (see the module docstring); `state` is the previous piece's
        (x, delta, rope). Writes q, k, v into the static buffers except for the last piece."""
        m, ops = self.model, self.ops
        if i == 0:
            rope = m.rope(self.pos[:b], ops)
            x, delta = m.embed_tokens(self.ids[:b]), None
        else:
            x, _, rope = state
            x, delta = m.mlp_block(i - 1, x, self.attn[:b], ops)
        if i == self.num_layers:
            return x, delta, rope
        x, *_ = m.attention_inputs(i, x, delta, rope, ops, out=(self.q[:b], self.k[:b], self.v[:b]))
        return x, None, rope

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits at `logit_rows` of a step of t = len(input_ids) <= tmax tokens: the model's
        forward pass, by piece replays (eagerly over the same buffers where nothing was captured,
        e.g. on the CPU) with attention launched between them."""
        t = input_ids.shape[0]
        b = self.bucket(t)
        assert b is not None and t >= 1, t
        self.ids[:t].copy_(input_ids)  # rows t.. keep earlier steps' ids and positions: valid, unread
        self.pos[:t].copy_(positions)
        pieces, state = self.graphs.get(b, (None, None))
        q, k, v, out = self.q[:t], self.k[:t], self.v[:t], self.attn[:t]
        for i in range(self.num_layers + 1):
            if pieces is not None:
                pieces[i].replay()
            else:
                state = self._piece(b, i, state)
            if i < self.num_layers:
                self.backend.forward(i, q, k, v, meta, out=out)
        x, delta, _ = state
        return self.model.head(x, delta, logit_rows, self.ops)

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.buckets):  # largest first: smaller buckets reuse its pool memory
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graphs, as CUDA graphs require
                state = None
                for i in range(self.num_layers + 1):
                    state = self._piece(b, i, state)
            torch.cuda.current_stream().wait_stream(stream)
            pieces, state = [], None
            for i in range(self.num_layers + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    state = self._piece(b, i, state)  # the previous state is freed: later pieces may reuse it
                pieces.append(graph)
            self.graphs[b] = (pieces, state)
        torch.cuda.synchronize()
