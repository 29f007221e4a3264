"""The sparsifier against its definition (SPEC §2.4), with hypothesis."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sab import sparsify, topk_select

settings.register_profile("sab", deadline=None, max_examples=150)
settings.load_profile("sab")


def distinct_scores(min_size=1, max_size=12):
    return st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
                    min_size=min_size, max_size=max_size, unique=True)


int_scores = st.lists(st.integers(-50, 50), min_size=1, max_size=12)


@given(distinct_scores(), st.integers(0, 14))
def test_exactly_k_top_nonzero_when_distinct(scores, k):
    a = torch.tensor(scores, dtype=torch.float64)
    w = sparsify(a, k)
    n = len(scores)
    if n <= k:  # nothing to threshold: softmax over all (may underflow to 0 for far scores)
        torch.testing.assert_close(w, torch.softmax(a, -1))
        return
    assert int((w > 0).sum()) == k
    if k > 0:  # the kept ones are the k largest
        kept = set(torch.nonzero(w > 0).flatten().tolist())
        assert kept == set(a.topk(k).indices.tolist())


@given(int_scores, st.integers(1, 14))
def test_nonnegative_sums_to_one_or_all_zero_on_tie(scores, k):
    a = torch.tensor(scores, dtype=torch.float64)
    w = sparsify(a, k)
    assert not torch.isnan(w).any()
    assert (w >= 0).all()
    total = float(w.sum())
    ordered = sorted(scores, reverse=True)
    if len(scores) > k and ordered[0] == ordered[k]:
        # the top scores tie with the (k+1)-th: the documented all-zero case
        assert total == 0.0
    else:
        assert math.isclose(total, 1.0, rel_tol=1e-12)


@given(int_scores, st.integers(0, 14), st.integers(-1000, 1000))
def test_invariant_to_adding_a_constant(scores, k, shift):
    a = torch.tensor(scores, dtype=torch.float64)  # integers: the shift is exact
    torch.testing.assert_close(sparsify(a + shift, k), sparsify(a, k), rtol=1e-12, atol=0)


@given(distinct_scores(min_size=2), st.integers(1, 14), st.integers(0, 2**31 - 1))
def test_gradient_flows_only_to_kept_scores(scores, k, seed):
    a = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    w = sparsify(a, k)
    r = torch.randn(len(scores), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    (w * r).sum().backward()
    if len(scores) > k:
        kept = torch.zeros(len(scores), dtype=torch.bool)
        kept[a.detach().topk(k).indices] = True  # the k largest (weights may underflow to 0)
        assert (a.grad[~kept] == 0).all()  # includes the (k+1)-th: δ is stop-gradient


def test_threshold_gets_no_gradient_even_at_exact_zero():
    # a - δ == 0 exactly for the (k+1)-th score: clamp_min would pass gradient there, relu not
    a = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    w = sparsify(a, 2)
    (w * torch.tensor([1.0, -2.0, 5.0, 7.0], dtype=torch.float64)).sum().backward()
    assert a.grad[2] == 0 and a.grad[3] == 0
    assert a.grad[0] != 0 and a.grad[1] != 0


def test_definition_values():
    a = torch.tensor([[4.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
    # δ = 3rd largest = 2; ã = [2, 0, 1, 0]; w = ã / 3
    torch.testing.assert_close(sparsify(a, 2), torch.tensor([[2 / 3, 0, 1 / 3, 0]],
                                                             dtype=torch.float64))
    # n <= k_top: softmax of all scores
    torch.testing.assert_close(sparsify(a, 4), torch.softmax(a, -1))
    torch.testing.assert_close(sparsify(a, 9), torch.softmax(a, -1))
    assert (sparsify(a, 0) == 0).all()


def test_all_equal_scores_give_zero_weights_not_nan():
    a = torch.zeros(3, 5, requires_grad=True)
    w = sparsify(a, 2)
    assert (w == 0).all()
    w.sum().backward()
    assert torch.isfinite(a.grad).all() and (a.grad == 0).all()


def test_batched_over_last_dimension():
    a = torch.randn(4, 3, 7, dtype=torch.float64)
    w = sparsify(a, 3)
    assert w.shape == a.shape
    for idx in [(0, 0), (3, 2), (1, 1)]:
        torch.testing.assert_close(w[idx], sparsify(a[idx], 3))
    weights, indices = topk_select(a, 3)
    assert weights.shape == indices.shape == (4, 3, 3)
    torch.testing.assert_close(w.gather(-1, indices), weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_rejected(bad):
    with pytest.raises(ValueError, match="finite"):
        sparsify(torch.tensor([1.0, bad, 0.0]), 1)


def test_bad_k_top():
    with pytest.raises(ValueError, match="k_top"):
        sparsify(torch.zeros(3), -1)
    with pytest.raises(ValueError, match="k_top"):
        sparsify(torch.zeros(3), 1.5)


@given(distinct_scores(min_size=2), st.integers(1, 14), st.floats(1e-6, 1.0))
def test_paper_epsilon_form(scores, k, eps):
    """w = ã / (Σã + ε): the same support, weights scaled by Σã / (Σã + ε)."""
    a = torch.tensor(scores, dtype=torch.float64)
    exact, with_eps = sparsify(a, k), sparsify(a, k, eps=eps)
    if len(scores) <= k:
        torch.testing.assert_close(with_eps, exact)  # softmax: nothing to threshold
        return
    shifted = torch.relu(a - a.topk(k + 1).values[-1])
    torch.testing.assert_close(with_eps, shifted / (shifted.sum() + eps))
    assert float(with_eps.sum()) <= 1.0


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_written_out_threshold_backward_equals_autograd(eps):
    """threshold_weights_grad (used by the layer's one-node attention) against autograd through
    threshold_weights, including rows where kept scores tie with δ and all-tied rows."""
    from sab.sparsifier import threshold_weights, threshold_weights_grad
    g = torch.Generator().manual_seed(0)
    top = torch.randn(50, 4, dtype=torch.float64, generator=g).sort(-1, descending=True).values
    delta = top[:, 3].clone() - torch.rand(50, dtype=torch.float64, generator=g)
    top[:5] = delta[:5].unsqueeze(-1)  # all kept scores tie with δ: weights 0, no credit
    top[5:10, 2] = delta[5:10]  # the last kept score ties with δ
    top = top.requires_grad_()
    w = threshold_weights(top, delta, eps)
    grad = torch.randn(50, 4, dtype=torch.float64, generator=g)
    expected, = torch.autograd.grad(w, top, grad)
    got = threshold_weights_grad(grad, top.detach(), delta, w.detach(), eps)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)
    assert (got[:5] == 0).all() and (got[5:10, 2] == 0).all()


def test_written_out_mlp_score_backward_equals_autograd():
    from sab.scorer import mlp_scores_grad
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(3, 4, dtype=torch.float64, generator=g)
    a = torch.tanh(q.unsqueeze(1) + k) @ v
    expected = torch.autograd.grad(a, (q, k, v), grad)
    for x, y in zip(mlp_scores_grad(q.detach(), k.detach(), v.detach(), grad), expected):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
