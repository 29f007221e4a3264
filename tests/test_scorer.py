"""The MLP scorer's ranking against its definition ``a_i = v·tanh(q + k_i)`` (SPEC §2.3): the
sigmoid form, the rational form from the bank's cache ``e^{−2k}`` and its fallback, and the
bank keeping that cache up to date through writes, eviction, growth and copies."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sab.scorer
from sab import native
from sab.memory import MemoryBank
from sab.scorer import MLPScorer, rational_limit


def definition(scorer: MLPScorer, query, keys):
    return torch.tanh(query.unsqueeze(1) + keys) @ scorer.v  # (B, n)


def make(d: int, seed: int) -> MLPScorer:
    torch.manual_seed(seed)
    return MLPScorer(3, d).double().requires_grad_(False)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 5), n=st.integers(1, 40), d=st.integers(1, 9), seed=st.integers(0, 999),
       scale=st.sampled_from([0.1, 1.0, 5.0, 30.0, 600.0]), tile=st.sampled_from([1, 7, 2 ** 18]),
       kernel=st.booleans())
def test_ranking_equals_the_definition(B, n, d, seed, scale, tile, kernel):
    """Sigmoid form and rational form (from the cache; by ``sab.native``'s kernel or by ATen
    operations) select the definition's best k and return its scores; queries and keys beyond
    the rational form's limit take the sigmoid form (float64: 319; scale 600 puts most of them
    beyond)."""
    scorer = make(d, seed)
    g = torch.Generator().manual_seed(seed)
    query = scale * torch.randn(B, d, dtype=torch.float64, generator=g)
    keys = scale * torch.randn(B, n, d, dtype=torch.float64, generator=g)
    ref = definition(scorer, query, keys)
    k = min(n, 1 + seed % 6)
    want_top, want_index = ref.topk(k, dim=-1)
    old = sab.scorer.RANK_TILE
    sab.scorer.RANK_TILE = tile  # rows per tile of the eager ranking
    try:
        with native.enabled(ranking=kernel):
            for cache in (None, scorer.rank_keys(keys)):
                top, index = scorer.rank(query, keys, k, cache)
                # ties (saturated tanh at large scale) may be broken either way: compare the
                # scores of the chosen memories, and the indices where the scores are distinct
                torch.testing.assert_close(top, want_top, rtol=0, atol=1e-12)
                torch.testing.assert_close(ref.gather(1, index), want_top, rtol=0, atol=1e-12)
                ranked = ref.topk(min(n, k + 1), dim=-1)[0]  # the chosen and the first left out
                distinct = n == 1 or bool((ranked[:, :-1] - ranked[:, 1:]).min() > 1e-9)
                if scale <= 5.0 and distinct:
                    assert torch.equal(index, want_index)
    finally:
        sab.scorer.RANK_TILE = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_ranking_kernel_reads_a_window_of_the_bank(dtype):
    """``sab.native``'s ``rational_scores`` on the bank's cache as the ranking passes it: a
    window of a larger buffer (strided), NaN where a cached key is out of range."""
    kernel = native.kernels("ranking")
    if kernel is None:
        pytest.skip("sab.native did not build (no C++ compiler)")
    g = torch.Generator().manual_seed(0)
    buf = torch.rand(3, 20, 37, dtype=torch.float64, generator=g).mul(4).exp()  # (B, cap, d)
    a, v = torch.rand(3, 37, dtype=torch.float64, generator=g), torch.randn(37, generator=g,
                                                                           dtype=torch.float64)
    window = buf[:, 4:15]  # (B, n, d) slots [4, 15)
    want = (v / (1 + a.unsqueeze(1) * window)).sum(-1)  # (B, n)
    got = kernel.rational_scores(a.to(dtype), buf.to(dtype)[:, 4:15], v.to(dtype))
    torch.testing.assert_close(got, want.to(dtype))
    window = window.clone()
    window[1, 2, 5] = float("nan")
    got = kernel.rational_scores(a, window, v)
    assert got[1, 2].isnan() and int(got.isnan().sum()) == 1
    with pytest.raises(RuntimeError, match="rational_scores"):
        kernel.rational_scores(a[:, :5], window, v)


def test_rank_keys_marks_keys_out_of_range():
    scorer = make(4, 0)
    limit = rational_limit(torch.float64)
    keys = torch.tensor([[[0.0, 1.0, -limit, limit + 1]]], dtype=torch.float64)
    cache = scorer.rank_keys(keys)
    torch.testing.assert_close(cache[..., :3], torch.exp(-2 * keys[..., :3]))
    assert cache[..., 3].isnan().all()


def test_rational_form_is_used_in_range_and_falls_back_outside(monkeypatch):
    """In range the rational form scores (the sigmoid form is not called); a query or a key out
    of range sends the ranking to the sigmoid form."""
    scorer = make(5, 1)
    calls = []
    sigmoid = scorer._sigmoid
    monkeypatch.setattr(scorer, "_sigmoid", lambda q, k: calls.append(1) or sigmoid(q, k))
    query, keys = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 8, 5, dtype=torch.float64)
    scorer.rank(query, keys, 3, scorer.rank_keys(keys))
    assert calls == []
    for q, kk in ((query * 1000, keys), (query, keys * 1000)):  # beyond float64's 319
        top, index = scorer.rank(q, kk, 3, scorer.rank_keys(kk))
        torch.testing.assert_close(top, definition(scorer, q, kk).topk(3, -1)[0], rtol=0,
                                   atol=1e-12)
    assert calls == [1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_ranking_matches_float64(dtype):
    """The rational form in float32 scores within float32 rounding of the definition."""
    scorer = make(128, 2)
    query = torch.randn(64, 128, dtype=torch.float64)
    keys = torch.randn(64, 200, 128, dtype=torch.float64)
    ref = definition(scorer, query, keys)
    s = scorer.to(dtype)
    top, index = s.rank(query.to(dtype), keys.to(dtype), 6, s.rank_keys(keys.to(dtype)))
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(top.double(), ref.gather(1, index), rtol=0, atol=tol)
    torch.testing.assert_close(top.double(), ref.topk(6, -1)[0], rtol=0, atol=tol)


@pytest.mark.parametrize("max_memories,linear", [(None, False), (5, False), (5, True)])
def test_bank_keeps_the_ranking_cache_up_to_date(max_memories, linear):
    """After every write — appends, evictions of the oldest (ring or sliding window), growth of
    the buffers — the cache over the valid window equals ``rank_keys`` of the keys; a fork's
    writes leave the original's cache alone."""
    B, H, d = 3, 4, 6
    scorer = make(d, 3)
    bank = MemoryBank.empty(B, H, d, max_memories=max_memories, dtype=torch.float64,
                            capacity=2, linear=linear)
    g = torch.Generator().manual_seed(0)
    for i in range(23):
        m = torch.randn(B, H, dtype=torch.float64, generator=g)
        bank.write(m, 3 * torch.randn(B, d, dtype=torch.float64, generator=g), i)
        if i % 3 == 2:
            continue  # several writes between rankings too
        start, stop = bank.window()
        cache = bank.ranking_keys(scorer.rank_keys)[:, start:stop]
        assert torch.equal(cache, scorer.rank_keys(bank.keys[:, start:stop])), i
    start, stop = bank.window()
    before = bank.ranking_keys(scorer.rank_keys)[:, start:stop].clone()
    fork = bank.fork()
    for i in range(4):
        fork.write(torch.randn(B, H, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64),
                   100 + i)
        fs, fe = fork.window()
        assert torch.equal(fork.ranking_keys(scorer.rank_keys)[:, fs:fe],
                           scorer.rank_keys(fork.keys[:, fs:fe]))
    assert torch.equal(bank.ranking_keys(scorer.rank_keys)[:, start:stop], before)
    for copy in (bank.detach(), bank.to(torch.float64)):
        assert copy.rank_cache is None and copy.stale == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rational_form_stays_in_range_for_the_dtype(dtype):
    """Where a factor e^{±2q}, e^{±2k} would overflow in the dtype (float16 already at |x| ≈ 5.5)
    the sigmoid form scores: the chosen memories' true scores are the best ones, to the dtype's
    rounding."""
    scorer = make(16, 4)
    g = torch.Generator().manual_seed(1)
    u = lambda *shape: torch.rand(*shape, dtype=torch.float64, generator=g)
    # q ∈ [5, 7], half the keys ∈ [−7, −5.6]: q + k is moderate, but in float16 e^{−2k}
    # overflows (while e^{−2q} does not underflow to 0, so no NaN warns of it)
    query = 5 + 2 * u(32, 16)
    keys = torch.cat([-5.6 - 1.4 * u(32, 20, 16), torch.randn(32, 20, 16, dtype=torch.float64,
                                                               generator=g)], 1)
    ref = definition(scorer, query, keys)
    s = make(16, 4).to(dtype)
    kk = keys.to(dtype)
    top, index = s.rank(query.to(dtype), kk, 4, s.rank_keys(kk))
    tol = {torch.float16: 0.05, torch.bfloat16: 0.2, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(ref.gather(1, index), ref.topk(4, -1)[0], rtol=0, atol=tol)
    torch.testing.assert_close(top.double(), ref.topk(4, -1)[0], rtol=0, atol=tol)
