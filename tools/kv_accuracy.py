"""KV cache accuracy: what int8 and int4 K/V cost against the model's own dtype, on real weights.

On the embedded SmolLM2-135M-Instruct (CPU, torch reference attention), over the fixed passages of
tools/kv_accuracy_prompts.txt, for each KV storage (auto = the model's dtype, int8, int4):

- teacher-forced: one prefill over each whole passage; at every position, the next-token
  distribution against auto's: top-1 agreement, KL(auto || quantized) in nats (mean, p99, max),
  and the mean negative log-likelihood of the passage's real next tokens;
- greedy: --new-tokens tokens after each passage, all passages in one batch; how many
  continuations equal auto's, and where each first departs from it (--new-tokens if never).

Then the KV bytes per token of each storage for this model and the workload's models
(gpu/workload.json), against bf16. `--variants` adds teacher-forced rows for other 4-bit layouts,
applied as a quantize-dequantize round trip of K and V before a float arena (fake quantization):
the shipped format (which must equal the int4 row), other group sizes and scale dtypes,
asymmetric groups, keys per channel (KIVI), and two exact transforms before per-token groups: a
Hadamard rotation of each head's K and V (QuaRot; the query and output would rotate alike) and
keys less a static per-channel mean (softmax ignores a shift common to all keys; the mean is
calibrated on the first passages).

    python tools/kv_accuracy.py [--new-tokens 32] [--variants] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from workload import load_spec  # noqa: E402

from gpu.arena import INT4, KVQuant, kv_bytes_per_token  # noqa: E402
from gpu.attention import TorchAttention, build_metadata  # noqa: E402
from gpu.models import load_model  # noqa: E402
from gpu.runner import ModelRunner, SeqInput  # noqa: E402
from gpu.sampler import SampleSpec  # noqa: E402

BLOCK = 16
PROMPTS = Path(__file__).with_name("kv_accuracy_prompts.txt")
KV = {"auto": None, "int8": torch.int8, "int4": torch.int4}
CHUNK = 4  # passages per teacher-forced prefill


def read_passages(path: Path = PROMPTS) -> list[str]:
    """The passages of the prompts file: blocks between lines holding only "===", comments before."""
    blocks = path.read_text().split("\n===\n")[1:]
    return [b.strip("\n") for b in blocks if b.strip()]


class Progress:
    """One stderr line, rewritten in place: label, done/total, elapsed."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.t0 = label, total, time.perf_counter()

    def __call__(self, done: int) -> None:
        bar = "#" * (20 * done // self.total)
        sys.stderr.write(f"\r  {self.label:<30} [{bar:<20}] {done}/{self.total} {time.perf_counter() - self.t0:5.0f}s")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _tables(lengths: list[int]) -> tuple[list[list[int]], int]:
    tables, at = [], 0
    for n in lengths:
        k = -(-n // BLOCK)
        tables.append(list(range(at, at + k)))
        at += k
    return tables, at


# --- fake-quantized layouts (--variants) ----------------------------------------------------------

Transform = Callable[[torch.Tensor, int, object], torch.Tensor]  # (T, Hkv, D) new K or V, layer, metadata -> same


def per_token(quant: KVQuant) -> Transform:
    """Round trip through an arena format: what the arena would hand back."""
    return lambda x, layer, meta: quant.dequantize(*quant.quantize(x), x.dtype)


def hadamard(d: int) -> torch.Tensor:
    """The orthonormal (d, d) Sylvester Hadamard matrix (symmetric: its own inverse)."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / d**0.5


def rotated(inner: Transform, d: int) -> Transform:
    """`inner` on each row rotated by the Hadamard matrix, rotated back."""
    h = hadamard(d)
    return lambda x, layer, meta: (inner(x.float() @ h, layer, meta) @ h).to(x.dtype)


def less_mean(inner: Transform, means: dict[int, torch.Tensor]) -> Transform:
    """`inner` on keys less their layer's calibrated mean (Hkv, D), added back."""
    return lambda x, layer, meta: inner(x - means[layer], layer, meta) + means[layer]


def asymmetric(group: int) -> Transform:
    """4-bit codes in [0, 15] over each group's [min, max], float16 scale and minimum."""

    def f(x: torch.Tensor, layer: int, meta) -> torch.Tensor:
        g = x.float().unflatten(-1, (-1, group))
        lo = g.amin(-1, keepdim=True).half().float()
        scale = ((g.amax(-1, keepdim=True) - lo) / 15).half().float()
        codes = torch.where(scale > 0, (g - lo) / scale, 0.0).round().clamp(0, 15)
        return (codes * scale + lo).flatten(-2).to(x.dtype)

    return f


def keys_per_channel(tokens: int) -> Transform:
    """KIVI's keys: one float16 scale per channel and run of `tokens` consecutive positions of a
    request (the whole run known at once: exact for a prefill from position 0, as here)."""

    def f(x: torch.Tensor, layer: int, meta) -> torch.Tensor:
        out, start = torch.empty_like(x), 0
        for q_len in meta.q_lens_host:
            for lo in range(start, start + q_len, tokens):
                hi = min(lo + tokens, start + q_len)
                g = x[lo:hi].float()  # (n, Hkv, D): absmax over the positions, per head and channel
                scale = (g.abs().amax(0) / 7).half().float()
                inv = torch.where(scale > 0, 1 / scale, 0.0)
                out[lo:hi] = ((g * inv).round().clamp(-7, 7) * scale).to(x.dtype)
            start += q_len
        return out

    return f


class FakeQuant:
    """The torch backend over a float arena, K and V replaced by their round trip first."""

    name = "torch"

    def __init__(self, inner: TorchAttention, k_fn: Transform, v_fn: Transform) -> None:
        self.inner, self.k_fn, self.v_fn = inner, k_fn, v_fn

    def forward(self, layer, q, k, v, meta, out=None):
        return self.inner.forward(layer, q, self.k_fn(k, layer, meta), self.v_fn(v, layer, meta), meta, out)


class KeyMeans:
    """The torch backend, recording the mean of each layer's new keys over a prefill in `means`."""

    name = "torch"

    def __init__(self, inner: TorchAttention, means: dict[int, torch.Tensor]) -> None:
        self.inner, self.means = inner, means

    def forward(self, layer, q, k, v, meta, out=None):
        self.means[layer] = k.float().mean(0)  # (Hkv, D)
        return self.inner.forward(layer, q, k, v, meta, out)


def variants(d: int, means: dict[int, torch.Tensor]) -> dict[str, tuple[Transform, Transform, int]]:
    """name -> (K transform, V transform, bytes a (token, kv head) row of K and V together)."""
    g64, bf = KVQuant(4, 64, torch.float16), KVQuant(4, 32, torch.bfloat16)
    g32, row = per_token(INT4), 2 * INT4.row_bytes(d)
    return {
        "int4 g32 fp16 (shipped)": (g32, g32, row),
        "int4 g64 fp16": (per_token(g64), per_token(g64), 2 * g64.row_bytes(d)),
        "int4 g32 bf16 scales": (per_token(bf), per_token(bf), 2 * bf.row_bytes(d)),
        "int4 g64 asymmetric": (asymmetric(64), asymmetric(64), 2 * (d // 2 + 4 * d // 64)),
        "int4 g32 asymmetric": (asymmetric(32), asymmetric(32), 2 * (d // 2 + 4 * d // 32)),
        "K per channel /32 tok, V g32": (keys_per_channel(32), g32, d // 2 + 2 * d // 32 + INT4.row_bytes(d)),
        "g32, K and V Hadamard-rotated": (rotated(g32, d), rotated(g32, d), row),
        "g32, K less its mean": (less_mean(g32, means), g32, row),
        "g32, K less its mean, rotated; V rotated": (less_mean(rotated(g32, d), means), rotated(g32, d), row),
    }


# --- measurements -------------------------------------------------------------------------------


@torch.inference_mode()
def teacher_forced(model, seqs: list[list[int]], kv_dtype, wrap=None) -> torch.Tensor:
    """Log-probs (sum(len - 1), vocab) of every next token of every passage, one prefill."""
    tables, nblocks = _tables([len(s) for s in seqs])
    runner = ModelRunner(model, nblocks, BLOCK, "torch", kv_dtype=kv_dtype)
    backend = wrap(runner.backend) if wrap else runner.backend
    meta = build_metadata([len(s) for s in seqs], [len(s) for s in seqs], tables, BLOCK, "cpu")
    rows, start = [], 0
    for s in seqs:  # every position but the last predicts the next token
        rows += range(start, start + len(s) - 1)
        start += len(s)
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.tensor([i for s in seqs for i in range(len(s))])
    return torch.log_softmax(model.forward(ids, pos, meta, backend, torch.tensor(rows)).float(), -1)


@torch.inference_mode()
def greedy(model, kv_dtype, prompts, new_tokens: int, eos: frozenset[int], label: str) -> list[list[int]]:
    """Greedy continuations of every prompt, all in one batch: one prefill step, then decode steps."""
    tables, nblocks = _tables([len(p) + new_tokens for p in prompts])
    runner = ModelRunner(model, nblocks, BLOCK, "torch", kv_dtype=kv_dtype)
    spec = SampleSpec()
    show = Progress(label, new_tokens)
    outs = [[t] for t in runner.step([SeqInput(p, 0, tb, spec) for p, tb in zip(prompts, tables, strict=True)])]
    show(1)
    for step in range(1, new_tokens):
        live = [i for i, o in enumerate(outs) if o[-1] not in eos]
        if live:
            seqs = [SeqInput([outs[i][-1]], len(prompts[i]) + len(outs[i]) - 1, tables[i], spec) for i in live]
            for i, tok in zip(live, runner.step(seqs), strict=True):
                outs[i].append(tok)
        show(step + 1)
    return outs


class Stats:
    """Per-position comparisons of one KV storage against auto, accumulated over chunks."""

    def __init__(self) -> None:
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        self.nll: list[torch.Tensor] = []

    def add(self, base: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> None:
        self.kl.append((base.exp() * (base - logp)).sum(-1).clamp(min=0))
        self.agree.append(base.argmax(-1) == logp.argmax(-1))
        self.nll.append(-logp.gather(1, targets[:, None])[:, 0])

    def row(self) -> tuple[float, float, float, float, float]:
        kl, agree, nll = torch.cat(self.kl), torch.cat(self.agree), torch.cat(self.nll)
        return agree.float().mean().item(), kl.mean().item(), kl.quantile(0.99).item(), kl.max().item(), nll.mean().item()


def first_divergence(a: list[int], b: list[int], n: int) -> int:
    """Index of the first differing token (n if the continuations agree up to n or an EOS)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), n if a == b else min(len(a), len(b)))


def shapes(spec: dict) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a workload.json model entry."""
    d = spec.get("head_dim") or spec["hidden_size"] // spec["num_attention_heads"]
    return spec["num_hidden_layers"], spec["num_key_value_heads"], d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per passage (EOS stops early)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights and auto's KV dtype (bfloat16: the GPU's, emulated on the CPU)")
    ap.add_argument("--variants", action="store_true", help="also teacher-force other 4-bit layouts (fake-quantized)")
    ap.add_argument("--prompts", type=Path, default=PROMPTS, help="passages file (see the default's header)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    loaded = load_model("smollm2", "cpu", getattr(torch, args.dtype))
    model = loaded.model
    s = model.spec
    passages = [loaded.tokenizer.encode(p) for p in read_passages(args.prompts)]
    lens = [len(p) for p in passages]
    print(f"smollm2 ({args.dtype}, CPU, {torch.get_num_threads()} threads): {len(passages)} passages of "
          f"{min(lens)}-{max(lens)} tokens (mean {statistics.mean(lens):.0f})", file=sys.stderr)

    # Teacher-forced, a chunk of passages at a time: auto's log-probs, then every other storage's.
    stats = {name: Stats() for name in KV if name != "auto"}
    auto_nll: list[torch.Tensor] = []
    fakes = {}
    if args.variants:
        means: dict[int, torch.Tensor] = {}
        teacher_forced(model, passages[:CHUNK], None, lambda b: KeyMeans(b, means))
        fakes = variants(s.head_dim, means)
    stats |= {name: Stats() for name in fakes}
    show = Progress("teacher-forced", len(passages))
    for lo in range(0, len(passages), CHUNK):
        seqs = passages[lo : lo + CHUNK]
        targets = torch.tensor([t for p in seqs for t in p[1:]])
        base = teacher_forced(model, seqs, None)
        auto_nll.append(-base.gather(1, targets[:, None])[:, 0])
        for name in KV:
            if name != "auto":
                stats[name].add(base, teacher_forced(model, seqs, KV[name]), targets)
        for name, (k_fn, v_fn, _) in fakes.items():
            stats[name].add(base, teacher_forced(model, seqs, None, lambda b, k=k_fn, v=v_fn: FakeQuant(b, k, v)), targets)
        show(min(lo + CHUNK, len(passages)))

    n = args.new_tokens
    outs = {name: greedy(model, kv, passages, n, loaded.eos_token_ids, f"greedy, {name} KV") for name, kv in KV.items()}
    wall = time.perf_counter() - t0

    native = model.dtype
    per_token = {name: kv_bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim, kv or native) for name, kv in KV.items()}
    bf16 = kv_bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim, torch.bfloat16)
    tokens = sum(lens) - len(lens)
    lines = [
        f"smollm2-135m-instruct, {args.dtype} weights, auto KV = {args.dtype}; {len(passages)} passages "
        f"({min(lens)}-{max(lens)} tokens, {tokens} teacher-forced positions), {n} greedy tokens each; "
        f"{wall:.0f} s on {torch.get_num_threads()} CPU threads",
        "",
        "| KV | bytes/token | tokens/GiB vs bf16 | top-1 agreement | mean KL | p99 KL | max KL | NLL/token "
        "| identical greedy | mean first divergence |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    divergence = {}
    for name in KV:
        first = [first_divergence(a, b, n) for a, b in zip(outs["auto"], outs[name], strict=True)]
        divergence[name] = first
        same = sum(a == b for a, b in zip(outs["auto"], outs[name], strict=True))
        if name == "auto":
            agree, kl, p99, kmax, nll = 1.0, 0.0, 0.0, 0.0, torch.cat(auto_nll).mean().item()
        else:
            agree, kl, p99, kmax, nll = stats[name].row()
        lines.append(f"| {name} | {per_token[name]} | {bf16 / per_token[name]:.2f}x | {agree:.2%} | {kl:.4f} | "
                     f"{p99:.4f} | {kmax:.3f} | {nll:.4f} | {same}/{len(passages)} | {statistics.mean(first):.1f} |")
    lines += ["", f"First divergence from auto's greedy tokens, per passage ({n}: none):", "",
              "| passage | tokens | " + " | ".join(k for k in KV if k != "auto") + " |",
              "| ---: | ---: | " + " | ".join("---:" for k in KV if k != "auto") + " |"]
    for i, length in enumerate(lens):
        lines.append(f"| {i + 1} | {length} | " + " | ".join(str(divergence[k][i]) for k in KV if k != "auto") + " |")
    if fakes:
        lines += ["", "4-bit layouts, fake-quantized (K and V round-tripped before a float arena), teacher-forced:", "",
                  "| layout | bytes/token | tokens/GiB vs bf16 | top-1 agreement | mean KL | p99 KL | max KL | NLL/token |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, (_, _, row) in fakes.items():
            agree, kl, p99, kmax, nll = stats[name].row()
            per = s.num_layers * s.num_kv_heads * row
            lines.append(f"| {name} | {per} | {bf16 / per:.2f}x | {agree:.2%} | {kl:.4f} | {p99:.4f} | {kmax:.3f} | "
                         f"{nll:.4f} |")
    models = [("smollm2-135m", (s.num_layers, s.num_kv_heads, s.head_dim))]
    models += [(name, shapes(cfg)) for name, cfg in load_spec()["models"].items()]
    lines += ["", "KV bytes per token (all layers, K and V, scales included):", "",
              "| model (layers, kv heads, D) | bf16 | int8 | int4 | int8 vs bf16 | int4 vs bf16 |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, (layers, hkv, d) in models:
        b = [kv_bytes_per_token(layers, hkv, d, dt) for dt in (torch.bfloat16, torch.int8, torch.int4)]
        lines.append(f"| {name} ({layers}, {hkv}, {d}) | {b[0]} | {b[1]} | {b[2]} | {b[0] / b[1]:.2f}x | "
                     f"{b[0] / b[2]:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
