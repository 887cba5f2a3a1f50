"""gpu/sampler.py on the CPU: greedy, temperature, top-k, top-p and seeded draws for a whole batch.

Seeded draws are checked against a float64 one-row reference fed the same noise, and against
themselves in other batches; unseeded and seeded draws against softmax(logits / T) by a chi-square
test on a small vocabulary, with fixed RNG seeds and a p-value bound far from anything a correct
sampler produces.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from gpu.sampler import SampleSpec, sample, seeded_uniform

MIX = [  # a batch of every kind of row; seeded rows come with several indices
    SampleSpec(),
    SampleSpec(0.7, top_p=0.9, seed=11, index=0),
    SampleSpec(1.0, top_k=50, seed=2**63 - 1, index=7),
    SampleSpec(0.7, top_p=0.9),
    SampleSpec(1.3, top_k=20, top_p=0.8, seed=0, index=3),
    SampleSpec(0.5, top_k=1, seed=5),  # top_k 1: greedy
    SampleSpec(1.0, seed=123456789, index=40),
    SampleSpec(2.0, top_k=5000, seed=9, index=1),  # k beyond the vocabulary: off
    SampleSpec(0.9, top_k=3),
]


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _uniform_ref(seed: int, index: int, col: int) -> float:
    """seeded_uniform in plain Python integers, from its description."""
    k = _lowbias32((seed >> 32) ^ 0x9E3779B9)
    k = _lowbias32(k ^ (seed & 0xFFFFFFFF))
    k = _lowbias32(k ^ index)
    ka, kb = k | 1, _lowbias32(k ^ 0x85EBCA6B)
    h = _lowbias32((col * ka + kb) & 0xFFFFFFFF)
    return ((h >> 9) * 2 + 1) / 2**24


def reference_draw(logits: torch.Tensor, spec: SampleSpec, u: torch.Tensor) -> tuple[int, float]:
    """One row in float64, the rules spelled out: (token, margin). The margin is how far the row
    is from a different outcome (the gap between the two best scores, of the k-th value from the
    next; 0 where a token within 1e-5 of the top-p boundary would change the draw); rows with a
    tiny margin may legitimately differ from float32 computations."""
    x = logits.double()
    x = (x - x.max()) / spec.temperature
    margin = float("inf")
    desc = x.sort(descending=True).values
    if 0 < spec.top_k < x.numel():
        kth = desc[spec.top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
        if desc[spec.top_k] < kth:
            margin = min(margin, (kth - desc[spec.top_k]).item())
    g = -(-u.double().log()).log()  # Gumbel noise
    if spec.top_p < 1.0:
        probs = torch.softmax(x, dim=-1)
        sp, order = probs.sort(descending=True, stable=True)
        before = sp.cumsum(0) - sp  # mass of the tokens ranked above each one
        near = (before - spec.top_p).abs() < 1e-5
        out, keep = x.clone(), x.clone()
        out[order[(before >= spec.top_p) | near]] = float("-inf")
        keep[order[(before >= spec.top_p) & ~near]] = float("-inf")
        x[order[before >= spec.top_p]] = float("-inf")
        if (out + g).argmax() != (keep + g).argmax():
            margin = 0.0
    score = x + g
    top2 = score.topk(2).values
    return int(score.argmax()), min(margin, (top2[0] - top2[1]).item())


def _noise(spec: SampleSpec, vocab: int) -> torch.Tensor:
    return seeded_uniform(torch.tensor([spec.seed]), torch.tensor([spec.index]), torch.arange(vocab)[None])[0]


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of counts against probs (cells with probs 0 must be empty)."""
    assert counts[probs == 0].sum() == 0, "drew a token of probability 0"
    n = counts.sum()
    live = probs > 0
    expected = probs[live].double() * n
    stat = ((counts[live].double() - expected) ** 2 / expected).sum()
    dof = live.sum().item() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def test_seeded_uniform_matches_its_integer_definition():
    seeds = [0, 1, 2**32 - 1, 2**32, 123456789012345, 2**63 - 1]
    cols = [0, 1, 2, 255, 65535, 65536, 151935, 2**31 - 1]
    for seed in seeds:
        for index in (0, 1, 4095):
            got = seeded_uniform(torch.tensor([seed]), torch.tensor([index]), torch.tensor([cols]))[0]
            assert got.dtype == torch.float32
            assert got.tolist() == [_uniform_ref(seed, index, c) for c in cols], (seed, index)


def test_seeded_uniform_is_open_unit_interval_and_a_function_of_its_inputs():
    seed, index = torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0])
    u = seeded_uniform(seed, index, torch.arange(50_000)[None])
    assert (u > 0).all() and (u < 1).all()
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    perm = torch.randperm(50_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seeded_uniform(seed, index, perm.expand(3, -1)), u[:, perm])
    assert torch.equal(seeded_uniform(seed[:1], index[:1], torch.arange(50_000)[None]), u[:1])


def test_greedy_rows_are_the_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(MIX), 1000, generator=gen)
    ids = sample(logits, MIX)
    assert ids.dtype == torch.int64 and ids.shape == (len(MIX),)
    want = logits.argmax(dim=-1)
    for i, spec in enumerate(MIX):
        if spec.greedy:
            assert ids[i] == want[i], i
    assert torch.equal(sample(logits, [SampleSpec()] * len(MIX)), want)
    top1 = [SampleSpec(0.8, top_k=1, top_p=0.5, seed=s) for s in range(len(MIX))]
    assert torch.equal(sample(logits, top1), want)


def test_16_bit_logits_give_the_tokens_of_their_float32_values():
    """The model hands over logits in its own dtype: greedy rows take the argmax of the bf16
    values (ties included: the first index wins in both), drawn rows are converted first (drawn
    in bf16, the noise would be rounded to 8 bits and pick other tokens)."""
    gen = torch.Generator().manual_seed(4)
    specs = [SampleSpec(), SampleSpec(0.8, top_k=40, seed=3)] + [SampleSpec(1.0, seed=i, index=i) for i in range(300)]
    logits = (torch.randn(len(specs), 1000, generator=gen) * 4).bfloat16()
    logits[0, 17] = logits[0, 400] = logits[0].max() + 1  # a tie, as bf16's 8 bits make common
    assert torch.equal(sample(logits, specs), sample(logits.float(), specs))
    assert sample(logits, [SampleSpec()])[0] == 17
    assert _calls(logits, [SampleSpec()] * len(specs)) == ["argmax"]  # no float32 copy of the batch


class _Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _calls(logits: torch.Tensor, specs: list[SampleSpec]) -> list[str]:
    with _Calls() as mode:
        sample(logits, specs)
    return mode.names


def test_an_all_greedy_batch_is_one_argmax():
    assert _calls(torch.randn(256, 100), [SampleSpec()] * 256) == ["argmax"]


def test_the_number_of_torch_ops_does_not_grow_with_the_batch():
    """A CPU stand-in for kernel launches: the same torch calls for 8 rows as for 256."""
    logits = torch.randn(256, 300)
    for specs in (MIX, [SampleSpec(0.7, top_p=0.9)], [SampleSpec(1.0, top_k=40, seed=1)], [SampleSpec(0.7, seed=2)]):
        small = (specs * 8)[:8]
        large = (specs * 256)[:256]
        assert _calls(logits[:8], small) == _calls(logits, large), specs


def test_seeded_draws_match_the_one_row_reference():
    gen = torch.Generator().manual_seed(1)
    vocab, checked = 1000, 0
    specs = [SampleSpec(t, k, p, seed=s, index=n)
             for s, (t, k, p) in enumerate([(0.7, 0, 0.9), (1.0, 50, 1.0), (1.3, 20, 0.8), (1.0, 0, 1.0), (0.3, 0, 0.5)])
             for n in range(40)]
    logits = torch.randn(len(specs), vocab, generator=gen) * 2
    ids = sample(logits, specs)
    for i, spec in enumerate(specs):
        want, margin = reference_draw(logits[i], spec, _noise(spec, vocab))
        if margin > 1e-4:
            assert ids[i] == want, (i, spec)
            checked += 1
    assert checked > 0.95 * len(specs)


def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(len(MIX), 1000, generator=gen) * 3
    ids = sample(logits, MIX)
    seeded = [i for i, s in enumerate(MIX) if s.seed is not None]
    for i in seeded:  # alone
        assert sample(logits[i:i + 1], [MIX[i]]) == ids[i], i
    rev = sample(logits.flip(0), MIX[::-1]).flip(0)  # every row elsewhere
    only = sample(logits[seeded], [MIX[i] for i in seeded])  # no unseeded or greedy neighbours
    no_top_p = [i for i in seeded if MIX[i].top_p == 1.0]  # then the batch is never sorted
    for j, i in enumerate(seeded):
        assert rev[i] == ids[i] and only[j] == ids[i], i
    unsorted = sample(logits[no_top_p], [MIX[i] for i in no_top_p])
    assert unsorted.tolist() == [ids[i].item() for i in no_top_p]
    padded = torch.cat([torch.randn(300, 1000, generator=gen), logits])
    many = sample(padded, [SampleSpec(0.8, top_p=0.95, seed=s) for s in range(300)] + MIX)[300:]
    assert all(many[i] == ids[i] for i in seeded)


def test_same_seed_and_index_same_token_other_index_other_tokens():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    draws = [sample(logits, [SampleSpec(1.0, seed=42, index=n)]).item() for n in range(60)]
    assert draws == [sample(logits, [SampleSpec(1.0, seed=42, index=n)]).item() for n in range(60)]
    assert len(set(draws)) > 30  # a flat-ish 1000-way draw: repeats are rare
    other = [sample(logits, [SampleSpec(1.0, seed=43, index=n)]).item() for n in range(60)]
    assert sum(a == b for a, b in zip(draws, other, strict=True)) < 10


def test_top_k_never_draws_outside_the_top_k():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    logits = torch.randn(3000, 200, generator=gen)
    specs = [SampleSpec(2.0, top_k=(1, 2, 5, 17, 0)[i % 5], seed=i if i % 2 else None) for i in range(3000)]
    ids = sample(logits, specs)
    for i, spec in enumerate(specs):
        if spec.top_k:
            kth = logits[i].topk(spec.top_k).values[-1]
            assert logits[i, ids[i]] >= kth, (i, spec)
    assert len(set(ids[4::5].tolist())) > 100  # rows with k off roam the whole vocabulary


def test_top_p_never_draws_outside_the_nucleus():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    logits = torch.randn(3000, 200, generator=gen) * 2
    specs = [SampleSpec(1.0, top_k=(0, 10)[i % 2], top_p=(0.3, 0.6, 0.9)[i % 3], seed=i if i % 4 else None)
             for i in range(3000)]
    ids = sample(logits, specs)
    for i, spec in enumerate(specs):
        x = logits[i].double()
        if spec.top_k:
            x = x.masked_fill(x < x.topk(spec.top_k).values[-1], float("-inf"))
        probs = torch.softmax(x, dim=-1)
        before = probs[probs > probs[ids[i]]].sum()  # mass ranked above the drawn token
        assert before < spec.top_p + 1e-5, (i, spec)
        assert probs[ids[i]] > 0, (i, spec)


def _expected(logits: torch.Tensor, spec: SampleSpec) -> torch.Tensor:
    """The distribution sample draws from, in float64, ties-free logits assumed."""
    x = logits.double() / spec.temperature
    if spec.top_k:
        x = x.masked_fill(x < x.topk(spec.top_k).values[-1], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if spec.top_p < 1.0:
        sp, order = probs.sort(descending=True)
        sp[sp.cumsum(0) - sp >= spec.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sp)
    return probs / probs.sum()


LOGITS = torch.tensor([2.0, 1.2, 0.9, 0.3, 0.0, -0.4, -1.1, -2.5])
SPECS = [SampleSpec(0.7), SampleSpec(1.5, top_k=5), SampleSpec(0.7, top_p=0.9), SampleSpec(1.0, top_k=6, top_p=0.8)]
N = 200_000  # draws per check: a bias of 1% in a cell of mass 0.1 gives a chi-square near 20


def test_unseeded_draws_follow_softmax_of_logits_over_t():
    torch.manual_seed(6)
    for spec in SPECS:
        ids = sample(LOGITS.expand(N, -1), [spec] * N)
        p = _chi2_pvalue(torch.bincount(ids, minlength=8), _expected(LOGITS, spec))
        assert p > 1e-6, (spec, p)


def test_seeded_draws_follow_softmax_of_logits_over_t():
    """Across seeds (one draw each) and along one request (one seed, every index)."""
    for spec in SPECS:
        across = [SampleSpec(spec.temperature, spec.top_k, spec.top_p, seed=s, index=0) for s in range(N)]
        along = [SampleSpec(spec.temperature, spec.top_k, spec.top_p, seed=7, index=n) for n in range(N)]
        for specs in (across, along):
            ids = sample(LOGITS.expand(N, -1), specs)
            p = _chi2_pvalue(torch.bincount(ids, minlength=8), _expected(LOGITS, spec))
            assert p > 1e-6, (specs[0], p)


def test_a_biased_sampler_fails_the_distribution_check():
    """The check has teeth: T 0.7 drawn as if it were 0.75 is rejected."""
    torch.manual_seed(6)
    ids = sample(LOGITS.expand(N, -1), [SampleSpec(0.75)] * N)
    assert _chi2_pvalue(torch.bincount(ids, minlength=8), _expected(LOGITS, SampleSpec(0.7))) < 1e-6


def test_extreme_temperatures_draw_without_nan():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(64, 500, generator=gen) * 10
    logits[:, :100] = float("-inf")  # a masked vocabulary
    for t in (1e-45, 1e-38, 1e-30, 1e-6):
        for k, p, seed in ((0, 1.0, None), (40, 0.9, 3), (0, 0.5, None), (7, 1.0, 1)):
            ids = sample(logits, [SampleSpec(t, k, p, seed=seed, index=i) for i in range(64)])
            assert torch.equal(ids, logits.argmax(dim=-1)), (t, k, p, seed)
    for t in (1e3, 1e30, 1e38):
        ids = sample(logits, [SampleSpec(t, seed=(None, 1)[i % 2], index=i) for i in range(64)])
        assert (ids >= 100).all() and (ids < 500).all(), t
        assert len(set(ids.tolist())) > 40  # near uniform over the unmasked 400
