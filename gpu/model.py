"""The attention-bearing forward pass of the Llama family (llama, mistral, qwen2, qwen3) in torch.

Works on a ragged, flattened batch of T tokens from many requests; attention goes through an
`AttentionBackend` over the KV arena. Weights use Hugging Face names and are fused at load time
(q|k|v in one GEMM, gate|up in one GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gpu.attention import AttentionBackend, AttnMetadata
from gpu.fused_ops import CudaOps, TorchOps, apply_rope, rms_norm

if TYPE_CHECKING:
    from gpu.parallel import TensorParallel

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts the forward pass needs, read from a Hugging Face config."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position: int

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        arch = config.model_type
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            arch=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            rms_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=arch == "qwen3",
            max_position=config.max_position_embeddings,
        )


def rope_tables(config, max_position: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_position, head_dim), float32, from transformers' own rotary class,
    so every rope_type it knows (default, llama3, yarn, ...) is computed the way HF computes it."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config=config).to(device)
    positions = torch.arange(max_position, device=device)[None]
    cos, sin = rotary(torch.zeros((), dtype=torch.float32, device=device), positions)
    return cos[0].float(), sin[0].float()


class Transformer:
    """Fused weights on one device plus the forward pass; holds no per-request state.

    With `tp` (gpu/parallel.py) it is one rank's part of a tensor-parallel model: `weights` are
    the whole checkpoint's, of which it keeps its slices, and `spec` becomes the rank's shapes
    (its heads, its slice of the MLP; the vocabulary stays whole)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], hf_config, device, dtype,
                 tp: TensorParallel | None = None) -> None:
        self.tp = tp
        self.vocab_start = 0
        if tp is not None:
            weights = tp.shard(spec, weights)
            self.vocab_start = tp.vocab_range(spec)[0]
            spec = tp.local_spec(spec)
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}

        def take(name: str) -> torch.Tensor:
            if name not in w:
                raise ValueError(f"weight {name!r} missing from the checkpoint")
            return w.pop(name)

        self.embed = take("model.embed_tokens.weight")  # (V, H)
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            layer = {
                "ln1": take(p + "input_layernorm.weight"),
                "ln2": take(p + "post_attention_layernorm.weight"),
                # (Hq*D + 2*Hkv*D, H): one GEMM yields q, k and v
                "qkv": torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                "o": take(p + "self_attn.o_proj.weight"),
                # (2*I, H): one GEMM yields gate and up
                "gate_up": torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                "down": take(p + "mlp.down_proj.weight"),
            }
            if spec.qkv_bias:
                layer["qkv_bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            if spec.qk_norm:
                layer["q_norm"] = take(p + "self_attn.q_norm.weight")
                layer["k_norm"] = take(p + "self_attn.k_norm.weight")
            self.layers.append(layer)
        self.norm = take("model.norm.weight")
        lm_head = w.pop("lm_head.weight", None)
        self.lm_head = self.embed if spec.tie_word_embeddings or lm_head is None else lm_head
        self.cos, self.sin = rope_tables(hf_config, spec.max_position, device)
        self.scale = spec.head_dim**-0.5
        self.torch_ops = TorchOps(self.cos, self.sin)

    def cuda_ops(self) -> CudaOps:
        """The fused CuPy kernels over this model's RoPE tables (CUDA only). They move 8 values a
        thread, so they need hidden and intermediate sizes that are multiples of 8 and a head_dim
        that is a multiple of 16 (true of every released model of these families)."""
        s = self.spec
        if s.hidden_size % 8 or s.intermediate_size % 8 or s.head_dim % 16:
            raise ValueError(f"the fused CUDA ops need hidden and intermediate sizes divisible by 8 and head_dim by 16; "
                             f"this model has {s.hidden_size}, {s.intermediate_size}, {s.head_dim}")
        return CudaOps(self.cos, self.sin)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttnMetadata,
        backend: AttentionBackend,
        logit_rows: torch.Tensor | None,
        ops=None,
    ) -> torch.Tensor:
        """input_ids, positions: (T,); logit_rows: (S,) indices into T, or None when every row samples
        (decode steps: no gather). Returns logits (S, V) in the
        model's dtype: greedy argmax reads them as they are (a 16-bit value converts to float32
        exactly, so the choice is the same), and the sampler converts only the rows it draws."""
        s = self.spec
        ops = ops or self.torch_ops
        # On CUDA, decode-shaped steps rotate q and the new keys inside the attention launch
        # (CudaAttention.forward_qkv); other steps run split_rope first. qk-norm models rotate with
        # torch ops: their gathered cos/sin, once per step.
        fused_rope = not s.qk_norm and ops.name == "cuda" and backend.fuses_rope(meta, s.num_heads)
        rope = None if fused_rope else self.rope(positions, ops)
        x, delta = self.embed_tokens(input_ids), None  # the residual stream (T, H) and what the last block adds
        for i in range(s.num_layers):
            if fused_rope:
                x, qkv = self.qkv(i, x, delta, ops)
                attn = backend.forward_qkv(i, qkv, (self.cos, self.sin), s.num_heads, meta)  # (T, Hq, D)
            else:
                x, q, k, v = self.attention_inputs(i, x, delta, rope, ops)
                attn = backend.forward(i, q, k, v, meta)  # (T, Hq, D)
            x, delta = self.mlp_block(i, x, attn, ops)
        return self.head(x, delta, logit_rows, ops)

    # The pieces of `forward`, in order, for callers that run the layers between attention launches
    # themselves (gpu/piecewise.py captures them in CUDA graphs).
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) ids -> (T, H) rows of the embedding; under `tp`, each rank's vocabulary slice
        looks up its ids (zeros for the others' ids) and an all-reduce completes the rows."""
        if self.tp is None:
            return self.embed[input_ids]
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)] * mine[:, None].to(self.embed.dtype)
        return self.tp.all_reduce(x)

    def rope(self, positions: torch.Tensor, ops):
        """The step's RoPE operand for `attention_inputs`."""
        return (self.torch_ops if self.spec.qk_norm else ops).rope(positions, self.dtype)

    def qkv(self, i: int, x: torch.Tensor, delta: torch.Tensor | None, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's residual add, input norm and QKV projection: (x, qkv (T, q_size + 2*kv_size))."""
        layer = self.layers[i]
        x, h = ops.add_rms_norm(x, delta, layer["ln1"], self.spec.rms_eps)
        return x, F.linear(h, layer["qkv"], layer.get("qkv_bias"))

    def attention_inputs(self, i: int, x, delta, rope, ops, out=None):
        """Layer i up to its attention: (x, q, k, v), q and k rotated; into `out` (q, k, v) if given."""
        s = self.spec
        x, qkv = self.qkv(i, x, delta, ops)
        if s.qk_norm:  # per-head norm before RoPE: torch ops (no fused kernel for it)
            q, k, v = self._split_norm_rope(qkv, self.layers[i], rope)
            if out is not None:
                for o, t in zip(out, (q, k, v), strict=True):
                    o.copy_(t)
                q, k, v = out
        else:
            q, k, v = ops.split_rope(qkv, rope, s.num_heads, s.num_kv_heads, s.head_dim, out)
        return x, q, k, v

    def mlp_block(self, i: int, x, attn, ops):
        """Layer i after its attention: o projection, residual add and norm, MLP. (x, delta)."""
        s, layer = self.spec, self.layers[i]
        o = ops.residual_linear(attn.reshape(-1, s.num_heads * s.head_dim), layer["o"])
        if self.tp is not None:  # each rank's heads give a partial sum of the projection
            o = self.tp.all_reduce(o)
        x, h = ops.add_rms_norm(x, o, layer["ln2"], s.rms_eps)
        down = ops.residual_linear(ops.silu_mul(F.linear(h, layer["gate_up"])), layer["down"])
        return x, down if self.tp is None else self.tp.all_reduce(down)

    def head(self, x, delta, logit_rows, ops):
        """Final residual add, norm and LM head, at `logit_rows` only (None: every row)."""
        if logit_rows is not None:  # only the rows that sample; delta may be split-K partials (S, T, H)
            x, delta = x[logit_rows], delta[logit_rows] if delta.dim() == 2 else delta[:, logit_rows]
        _, x = ops.add_rms_norm(x, delta, self.norm, self.spec.rms_eps)
        logits = F.linear(x, self.lm_head)  # (S, V), or (S, V / tp.size) of this rank's vocabulary
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def _split_norm_rope(self, qkv, layer, rope):
        s = self.spec
        q, k, v = qkv.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], dim=-1)
        q = rms_norm(q.reshape(-1, s.num_heads, s.head_dim), layer["q_norm"], s.rms_eps)
        k = rms_norm(k.reshape(-1, s.num_kv_heads, s.head_dim), layer["k_norm"], s.rms_eps)
        cos, sin = rope
        return (apply_rope(q, cos, sin).contiguous(), apply_rope(k, cos, sin).contiguous(),
                v.reshape(-1, s.num_kv_heads, s.head_dim).contiguous())
