"""Credit-assignment rules of SPEC §3, checked from outside through ``return_attention``."""
import pytest
import torch

from conftest import make_sab


def predicted_steps(rec, t0, b, k_trunc, step0=0):
    """Input steps that a loss at t0 must reach: t0's block, the blocks of the memories selected
    (with non-zero weight) anywhere in it, and recursively theirs."""
    seen, todo = set(), [t0]
    while todo:
        t = todo.pop()
        g = step0 + t
        start = t - (g % k_trunc) if k_trunc else 0
        start = max(start, 0)
        for u in range(start, t + 1):
            if u in seen:
                continue
            seen.add(u)
            w, steps = rec.weights[u, b], rec.memory_steps[u, b]
            for j in range(w.shape[0]):
                if w[j] > 0:
                    todo.append(int(steps[j]) - step0)
    return seen


@pytest.mark.parametrize("k_trunc,k_top,k_att", [(1, 1, 1), (3, 2, 2), (4, 1, 3), (2, 3, 1),
                                                 (5, 5, 2)])
def test_gradient_reaches_exactly_the_predicted_steps(k_trunc, k_top, k_att):
    T, B, I, H = 30, 3, 2, 4
    layer = make_sab(I, H, k_trunc=k_trunc, k_top=k_top, k_att=k_att, seed=k_trunc + k_top)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    out, _, (rec,) = layer(x, return_attention=True)
    hops = 0
    for t0 in (T - 1, T // 2, 7):
        gx, = torch.autograd.grad(out[t0].pow(2).sum(), x, retain_graph=True)
        for b in range(B):
            got = set(torch.nonzero(gx[:, b].abs().sum(-1) > 0).flatten().tolist())
            want = predicted_steps(rec, t0, b, k_trunc)
            assert got == want, (t0, b)
            hops += len(want) > k_trunc
    assert hops > 0  # credit did travel through memories beyond the local block


def test_memories_with_zero_weight_get_exactly_zero_gradient():
    """All scores equal (v = 0): the top scores tie with the (k+1)-th, every weight is 0, the
    memories are still read (recorded indices) but receive exactly no credit."""
    T, B = 12, 2
    layer = make_sab(2, 3, k_trunc=1, k_top=2, k_att=1)
    with torch.no_grad():
        layer.scorers[0].v.zero_()
    x = torch.randn(T, B, 2, dtype=torch.float64, requires_grad=True)
    out, _, (rec,) = layer(x, return_attention=True)
    assert (rec.indices[-1] >= 0).all() and (rec.weights[-1] == 0).all()
    gx, = torch.autograd.grad(out[-1].sum(), x)
    assert (gx[:-1] == 0).all() and (gx[-1] != 0).any()


@pytest.mark.parametrize("k,n", [(1, 6), (2, 9), (3, 4), (4, 4), (5, 3)])
def test_only_the_selected_memories_get_gradient(k, n):
    """Memories carried in as leaves: after one step, exactly the memories with non-zero weight
    have gradient; the (k+1)-th, which set the threshold δ, and all others have exactly zero."""
    from sab import RecurrentState
    from sab.memory import MemoryBank
    B, H = 5, 4
    layer = make_sab(3, H, k_trunc=1, k_top=k, k_att=100, seed=k + n)
    scorer = layer.scorers[0]
    mems = [torch.randn(B, H, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    bank = MemoryBank.empty(B, H, scorer.key_size, dtype=torch.float64)
    for j, m in enumerate(mems):
        bank.write(m, scorer.keys(m), j)
    state = RecurrentState(torch.zeros(1, B, H, dtype=torch.float64),
                           torch.zeros(1, B, H, dtype=torch.float64), [bank], n)
    x = torch.randn(1, B, 3, dtype=torch.float64)
    out, _, (rec,) = layer(x, state, return_attention=True)
    grads = torch.autograd.grad(out.pow(2).sum(), mems, allow_unused=True)
    grads = [torch.zeros_like(m) if g is None else g for g, m in zip(grads, mems)]
    with torch.no_grad():
        h_hat = out[0] - rec.summary[0]
        scores = scorer.scores(scorer.query(h_hat), scorer.keys(torch.stack(mems, 1)))  # (B, n)
    for b in range(B):
        credited = {j for j in range(n) if (grads[j][b] != 0).any()}
        weighted = {int(i) for i, w in zip(rec.indices[0, b], rec.weights[0, b]) if w > 0}
        assert credited == weighted
        assert len(weighted) == min(k, n)
        if n > k:
            assert int(scores[b].topk(k + 1).indices[k]) not in credited


@pytest.mark.parametrize("scorer", ["mlp", "dot", "release"])
@pytest.mark.parametrize("n", [2, 7])  # n <= k_top (softmax) and n > k_top (threshold)
def test_blocked_scores_credit_memories_through_the_summary_alone(scorer, n):
    """``block_score_grad=True``: a loss g·s(t) gives each memory exactly w_i·g (the value path)
    and the provisional state ĥ(t) only what the LSTM output sends it; the scorer's parameters
    still get gradient.  By default the memories also get credit through the scores."""
    from sab import RecurrentState
    from sab.memory import MemoryBank
    B, H, k = 4, 5, 3
    got = {}
    for block in (True, False):
        layer = make_sab(3, H, k_trunc=1, k_top=k, k_att=100, seed=n, scorer=scorer,
                         block_score_grad=block)
        sc = layer.scorers[0]
        gen = torch.Generator().manual_seed(7)
        mems = [torch.randn(B, H, dtype=torch.float64, generator=gen, requires_grad=True)
                for _ in range(n)]
        bank = MemoryBank.empty(B, H, sc.key_size, dtype=torch.float64)
        for j, m in enumerate(mems):
            bank.write(m, sc.keys(m.detach() if block else m), j)
        state = RecurrentState(torch.zeros(1, B, H, dtype=torch.float64),
                               torch.zeros(1, B, H, dtype=torch.float64), [bank], n)
        x = torch.randn(1, B, 3, dtype=torch.float64, generator=gen)
        _, _, (rec,) = layer(x, state, return_attention=True)
        g = torch.randn(B, H, dtype=torch.float64, generator=gen)
        (rec.summary[0] * g).sum().backward()
        grads = torch.stack([torch.zeros_like(m) if m.grad is None else m.grad for m in mems], 1)
        # the value path alone: memory j gets w_j · g
        value_path = torch.zeros(B, n, H, dtype=torch.float64)
        for b in range(B):
            for i, w in zip(rec.indices[0, b].tolist(), rec.weights[0, b]):
                value_path[b, i] += w * g[b]
        got[block] = (grads, value_path)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sc.parameters())
        if block:  # s(t) reaches ĥ(t), hence the LSTM weights, only through the scores
            assert all(getattr(layer, f"weight_{w}_l0").grad is None
                       or (getattr(layer, f"weight_{w}_l0").grad == 0).all() for w in ("ih", "hh"))
    torch.testing.assert_close(got[True][0], got[True][1], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(got[False][0], got[False][1])


@pytest.mark.parametrize("scorer", ["mlp", "dot", "release"])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_delta_grad_gives_the_scorer_the_true_derivative(scorer, eps):
    """With the scores blocked, the scorer's parameters reach the loss through the weights alone.
    ``delta_grad=True``: their gradient is the true derivative (central finite differences in
    float64, the ranking fixed), δ's own score included; with δ constant (the default) it is
    not.  Either way every memory gets exactly w_i·g and the (k_top+1)-th memory nothing."""
    from sab import RecurrentState
    from sab.memory import MemoryBank
    B, H, k, n = 4, 5, 3, 7
    gen = torch.Generator().manual_seed(11)
    mems = [torch.randn(B, H, dtype=torch.float64, generator=gen) for _ in range(n)]
    x = torch.randn(1, B, 3, dtype=torch.float64, generator=gen)
    g = torch.randn(B, H, dtype=torch.float64, generator=gen)

    def loss(layer, track=None):
        sc = layer.scorers[0]
        bank = MemoryBank.empty(B, H, sc.key_size, dtype=torch.float64)
        for j, m in enumerate(mems):
            m = m.clone().requires_grad_(track is not None)
            if track is not None:
                track.append(m)
            bank.write(m, sc.keys(m.detach()), j)  # blocked scores: keys of detached memories
        state = RecurrentState(torch.zeros(1, B, H, dtype=torch.float64),
                               torch.zeros(1, B, H, dtype=torch.float64), [bank], n)
        _, _, (rec,) = layer(x, state, return_attention=True)
        return (rec.summary[0] * g).sum(), rec

    grads = {}
    for delta_grad in (False, True):
        layer = make_sab(3, H, k_trunc=1, k_top=k, k_att=100, seed=3, scorer=scorer,
                         att_eps=eps, block_score_grad=True, delta_grad=delta_grad)
        sc = layer.scorers[0]
        tracked = []
        value, rec = loss(layer, tracked)
        value.backward()
        grads[delta_grad] = {name: p.grad.clone() for name, p in sc.named_parameters()}
        # memories: exactly the value path, w_i·g, and nothing for unselected ones
        expected = torch.zeros(B, n, H, dtype=torch.float64)
        for b in range(B):
            for i, w in zip(rec.indices[0, b].tolist(), rec.weights[0, b]):
                expected[b, i] += w * g[b]
        got = torch.stack([torch.zeros(B, H, dtype=torch.float64) if m.grad is None else m.grad
                           for m in tracked], 1)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # finite differences of the loss along each scorer parameter
    fd = {}
    with torch.no_grad():
        for name, p in sc.named_parameters():
            d = torch.randn(p.shape, dtype=torch.float64, generator=gen)
            p.add_(d, alpha=1e-6)
            up = loss(layer)[0]
            p.add_(d, alpha=-2e-6)
            down = loss(layer)[0]
            p.add_(d, alpha=1e-6)
            fd[name] = ((up - down) / 2e-6).item(), d
    for name, (numeric, d) in fd.items():
        assert (grads[True][name] * d).sum().item() == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    # δ constant: some parameter's gradient is not the derivative (the spurious "raise every
    # kept score above δ" direction)
    assert any(abs((grads[False][name] * d).sum().item() - numeric) > 1e-4 * (1 + abs(numeric))
               for name, (numeric, d) in fd.items())
