"""The sparse backtracking engine equals the reference engine (SPEC §4), float64 to 1e-10."""
import pytest
import torch

import sab
from sab.engines import _linear_store, forward_backward
from sab.layer import ForwardLog

from conftest import make_sab, param_grads


def every_step_loss(r):
    def loss_fn(start, stop, out, summary):  # additive over step ranges
        return (out * r[start:stop]).sum() + (summary.pow(2) * r[start:stop]).sum() * 0.5
    return loss_fn


def last_step_loss(r, T):
    def loss_fn(start, stop, out, summary):
        if not start <= T - 1 < stop:
            return None
        return (out[-1] * r[-1]).sum() + (summary[-1] * r[-1]).sum()
    loss_fn.loss_steps = [T - 1]
    return loss_fn


def run(layer, engine, x, loss_fn, state=None):
    layer.zero_grad()
    res = forward_backward(layer, x, loss_fn, state, engine=engine)
    return res, param_grads(layer)


CONFIGS = [
    dict(k_trunc=1, k_top=1, k_att=1),
    dict(k_trunc=3, k_top=2, k_att=2),
    dict(k_trunc=5, k_top=5, k_att=2),
    dict(k_trunc=4, k_top=1, k_att=3, num_layers=2),
    dict(k_trunc=2, k_top=3, k_att=1, num_layers=3, att_hidden=3),
    dict(k_trunc=2, k_top=2, k_att=1, max_memories=3),
    dict(k_trunc=7, k_top=2, k_att=2, scorer="release"),
    dict(k_trunc=3, k_top=2, k_att=2, scorer="dot"),
    dict(k_trunc=None, k_top=2, k_att=2),
    dict(k_trunc=3, k_top=0, k_att=1),
    dict(k_trunc=3, k_top=2, k_att=1, block_score_grad=True, num_layers=2),
    dict(k_trunc=4, k_top=2, k_att=2, block_score_grad=True, scorer="dot", att_eps=0.05),
    dict(k_trunc=3, k_top=2, k_att=1, block_score_grad=True, delta_grad=True, num_layers=2,
         att_eps=0.05),
    dict(k_trunc=4, k_top=2, k_att=2, block_score_grad=True, delta_grad=True, scorer="dot",
         max_memories=4),
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("loss", ["every", "last"])
@pytest.mark.parametrize("carried", [False, True])
def test_sparse_engine_equals_reference(kw, loss, carried):
    T, B, I, H = 26, 3, 3, 5
    layer = make_sab(I, H, seed=len(str(kw)), **kw)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=g)
    r = torch.randn(T, B, H, dtype=torch.float64, generator=g)
    loss_fn = every_step_loss(r) if loss == "every" else last_step_loss(r, T)
    state = None
    if carried:  # a previous chunk left h, c and memories (and a step phase mid-block)
        _, state = layer(torch.randn(11, B, I, dtype=torch.float64, generator=g))
        state = state.detach()
    ref, g_ref = run(layer, "reference", x, loss_fn, state)
    sp, g_sp = run(layer, "sparse", x, loss_fn, state)
    torch.testing.assert_close(sp.loss, ref.loss, rtol=1e-12, atol=1e-12)
    for name in g_ref:
        torch.testing.assert_close(g_sp[name], g_ref[name], rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(sp.state.h, ref.state.h, rtol=0, atol=1e-13)
    torch.testing.assert_close(sp.state.c, ref.state.c, rtol=0, atol=1e-13)
    assert sp.state.step == ref.state.step
    for a, b in zip(sp.state.memory, ref.state.memory):
        if a is None:
            assert b is None
            continue
        assert a.next_id == b.next_id
        torch.testing.assert_close(a.memories(), b.memories(), rtol=0, atol=1e-13)
    assert not sp.state.h.requires_grad
    assert all(m is None or not m.requires_grad for m in sp.state.memory)


def test_states_carry_across_chunks_identically():
    """Three chunks in a row, state carried (detached by the engine): the same trajectory."""
    T, B = 12, 2
    layer = make_sab(2, 4, k_trunc=5, k_top=2, k_att=2, max_memories=6)
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(T, B, 2, dtype=torch.float64, generator=g) for _ in range(3)]
    r = torch.randn(T, B, 4, dtype=torch.float64, generator=g)
    states = {"reference": None, "sparse": None}
    for x in chunks:
        grads = {}
        for engine in states:
            res, grads[engine] = run(layer, engine, x, every_step_loss(r), states[engine])
            states[engine] = res.state
        for name in grads["reference"]:
            torch.testing.assert_close(grads["sparse"][name], grads["reference"][name],
                                       rtol=1e-10, atol=1e-10)


def test_forward_log_holds_the_state_entering_every_block():
    """The sparse engine's log of a graph-free forward pass (buffers allocated once per chunk):
    a boundary at the chunk's start and at every cut of the global step, holding the (h, c) the
    layer itself reaches there and the memory window then; one ranking per step that read."""
    T, B, step0, H = 13, 2, 4, 4
    layer = make_sab(2, H, k_trunc=5, k_top=1, k_att=2)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(step0, B, 2, dtype=torch.float64, generator=g)
    x = torch.randn(T, B, 2, dtype=torch.float64, generator=g)

    def carried():  # a fresh state at global step 4 (2 memories), each call its own bank
        with torch.no_grad():
            return layer(x0)[1]

    st = carried()
    log = ForwardLog(T, B, H, layer.k_trunc, layer.k_top, x)
    store = _linear_store(layer, 0, st.memory[0], T, B, x)
    with torch.no_grad():
        layer._run_layer(0, x, st.h[0], st.c[0], store, st.step, False, log)
    assert [b.t for b in log.boundaries] == [0, 1, 6, 11]  # start, then global steps 5, 10, 15
    assert log.h.shape[0] >= len(log.boundaries)
    for b in log.boundaries:
        with torch.no_grad():
            ref = layer(x[:b.t], carried())[1] if b.t else carried()
        h, c = log.state(b.index)
        torch.testing.assert_close(h, ref.h[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, ref.c[0], rtol=1e-12, atol=1e-12)
        assert (b.count, b.next_id) == (len(ref.memory[0]), ref.memory[0].next_id)
    assert log.n_selections == T  # memories exist from the first step: every step ranked them


def test_input_gradient_flows_to_an_embedding():
    """An embedding before the layer (language modelling) gets the same gradient."""
    T, B, V = 15, 3, 7
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, 4).double()
    layer = make_sab(4, 5, k_trunc=3, k_top=2, k_att=2, num_layers=2)
    tokens = torch.randint(0, V, (T, B))
    r = torch.randn(T, B, 5, dtype=torch.float64)
    out = {}
    for engine in ("reference", "sparse"):
        emb.zero_grad()
        layer.zero_grad()
        forward_backward(layer, emb(tokens), every_step_loss(r), engine=engine)
        out[engine] = emb.weight.grad.clone()
    torch.testing.assert_close(out["sparse"], out["reference"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k_trunc,k_top,k_att", [(3, 1, 3), (4, 2, 3), (5, 3, 2)])
def test_loss_at_the_end_skips_blocks(k_trunc, k_top, k_att):
    """Only blocks that hold the loss or credited memories are recomputed, and they are exactly
    the blocks in which the reference engine's backward sends non-zero credit to the input;
    within a block, only the steps up to the last one credit enters at (its loss or its last
    credited memory): exactly the steps whose input gets non-zero credit.  Where memories are
    written inside blocks (k_att not a multiple of k_trunc) that is less than the block, and
    what the steps after it read must not count."""
    T, B = 60, 1
    layer = make_sab(2, 4, k_trunc=k_trunc, k_top=k_top, k_att=k_att, seed=11)
    x = torch.randn(T, B, 2, dtype=torch.float64)
    r = torch.randn(T, B, 4, dtype=torch.float64)
    res, _ = run(layer, "sparse", x, last_step_loss(r, T))
    xg = x.clone().requires_grad_()
    out, _, (rec,) = layer(xg, return_attention=True)
    (out[-1] * r[-1]).sum().backward()
    steps_with_credit = [t for t in range(T) if xg.grad[t].abs().sum() > 0]
    blocks_with_credit = {t // k_trunc for t in steps_with_credit}
    assert res.stats["steps_backpropagated"] == len(steps_with_credit)
    assert res.stats["blocks_skipped"] == T // k_trunc - len(blocks_with_credit)


def test_sparse_engine_rejects_baselines_and_batch_first():
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="sparse engine runs SABLSTM"):
        forward_backward(sab.LSTM(3, 4), x, lambda s, e, o, m: o.sum(), engine="sparse")
    with pytest.raises(ValueError, match="time-major"):
        forward_backward(sab.SABLSTM(3, 4, k_trunc=2, k_top=1, k_att=1, batch_first=True), x,
                         lambda s, e, o, m: o.sum(), engine="sparse")
    with pytest.raises(ValueError, match="engine must be one of"):
        forward_backward(sab.LSTM(3, 4), x, lambda s, e, o, m: o.sum(), engine="fast")


@pytest.mark.parametrize("model", ["lstm", "tbptt", "selfattn", "sab"])
def test_reference_engine_runs_every_model(model):
    kw = dict(sab=dict(k_trunc=3, k_top=2, k_att=2), tbptt=dict(k_trunc=3)).get(model, {})
    torch.manual_seed(0)
    rnn = sab.build_rnn(model, 3, 4, **kw)
    res = forward_backward(rnn, torch.randn(9, 2, 3), lambda s, e, o, m: (o + m).pow(2).mean())
    assert res.loss.ndim == 0 and not res.state.h.requires_grad
    assert all(p.grad is not None for p in rnn.parameters())


def test_dropout_between_layers():
    """Eval mode: no dropout, the engines are equal.  Training mode: the sparse engine draws its
    own masks (other draws than the reference's F.dropout) and trains with finite gradients."""
    T, B = 14, 2
    layer = make_sab(3, 4, k_trunc=3, k_top=2, k_att=1, num_layers=2, dropout=0.3)
    x = torch.randn(T, B, 3, dtype=torch.float64)
    r = torch.randn(T, B, 4, dtype=torch.float64)
    layer.eval()
    _, g_ref = run(layer, "reference", x, every_step_loss(r))
    _, g_sp = run(layer, "sparse", x, every_step_loss(r))
    for name in g_ref:
        torch.testing.assert_close(g_sp[name], g_ref[name], rtol=1e-10, atol=1e-10)
    layer.train()
    res, g_train = run(layer, "sparse", x, every_step_loss(r))
    assert torch.isfinite(res.loss) and all(torch.isfinite(g).all() for g in g_train.values())


def test_zero_credit_marks_no_memory_for_a_visit():
    """The sparse engine recomputes a memory's block only if the memory got credit: a read at a
    step no credit reached (after a recomputed block's memory) or of a memory with zero weight
    (its score tied with δ) sends exact zeros, which touch nothing."""
    from sab.memory import _Graph
    graph = _Graph(first_id=10)
    graph.n_ids = 5
    ids = torch.tensor([[10, 11, 12], [13, 9, 10]])  # (B=2, m=3); 9 came in detached
    gv, gk = torch.zeros(2, 3, 4), torch.zeros(2, 3, 2)
    gv[0, 1, 2] = 0.5  # memory 11: value credit
    gk[1, 0, 1] = -1e-30  # memory 13: key credit, however small
    gv[1, 1] = 1.0  # memory 9: not in the graph
    graph.accumulate(ids, gv, gk)
    assert graph.touched.tolist() == [False, True, False, True, False]
    assert not graph.is_touched(10, 11) and graph.is_touched(11, 12)
    gv2, _ = graph.take(11)
    assert float(gv2[0, 2]) == 0.5 and graph.take(10) == (None, None)


TOL_CONFIGS = [
    dict(k_trunc=3, k_top=2, k_att=1),
    dict(k_trunc=5, k_top=3, k_att=2, block_score_grad=True, delta_grad=True, att_eps=0.01),
    dict(k_trunc=4, k_top=2, k_att=3, scorer="dot"),
]


@pytest.mark.parametrize("kw", TOL_CONFIGS)
@pytest.mark.parametrize("tol", [0.1, 0.3])
def test_credit_tol_equals_the_reference_with_the_cut_memories_detached(kw, tol, monkeypatch):
    """The opt-in credit tolerance is defined as: the memories it cuts off get no credit at all.
    The reference engine over the per-step graph, with exactly those memories detached (their
    rows of the credit accumulator never filled), computes the same gradients; and the cut
    engine never visits more steps than the exact one."""
    from sab.memory import _Graph
    T, B = 48, 2
    layer = make_sab(3, 5, seed=3, **kw)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, 3, dtype=torch.float64, generator=g)
    r = torch.randn(T, B, 5, dtype=torch.float64, generator=g)
    loss_fn = last_step_loss(r, T)
    exact, g_exact = run(layer, "sparse", x, loss_fn)
    layer.zero_grad()
    cut = forward_backward(layer, x, loss_fn, engine="sparse", credit_tol=tol)
    g_cut = param_grads(layer)
    ids = cut.stats["cut_ids"][0]
    assert cut.stats["memories_cut"] == len(ids) > 0  # the test cuts something...
    assert cut.stats["steps_backpropagated"] <= exact.stats["steps_backpropagated"]
    assert any(not torch.allclose(g_cut[n], g_exact[n]) for n in g_exact)  # ...that mattered

    accumulate = _Graph.accumulate

    def detached(self, mem_ids, gv, gk):  # the reference, with memories `ids` detached
        self._ensure(gv, gk)
        if self.cut is None:
            self.cut = torch.zeros_like(self.touched)
        for i in ids:
            if 0 <= i - self.first_id < self.cut.shape[0]:
                self.cut[i - self.first_id] = True
        accumulate(self, mem_ids, gv, gk)

    monkeypatch.setattr(_Graph, "accumulate", detached)
    layer.fast_path = False  # the per-step graph: every read's credit goes through accumulate
    _, g_ref = run(layer, "reference", x, loss_fn)
    for name in g_ref:
        torch.testing.assert_close(g_cut[name], g_ref[name], rtol=1e-10, atol=1e-10, msg=name)


def test_credit_tol_zero_is_exact_and_bad_values_are_refused():
    T, B = 30, 2
    layer = make_sab(3, 5, k_trunc=3, k_top=2, k_att=1)
    x = torch.randn(T, B, 3, dtype=torch.float64)
    loss_fn = last_step_loss(torch.randn(T, B, 5, dtype=torch.float64), T)
    _, g_exact = run(layer, "sparse", x, loss_fn)
    layer.zero_grad()
    res = forward_backward(layer, x, loss_fn, engine="sparse", credit_tol=0.0)
    assert res.stats["memories_cut"] == 0
    for name, grad in param_grads(layer).items():
        assert torch.equal(grad, g_exact[name])
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="credit_tol must be a number in"):
            forward_backward(layer, x, loss_fn, engine="sparse", credit_tol=bad)
    with pytest.raises(ValueError, match="needs engine='sparse'"):
        forward_backward(layer, x, loss_fn, engine="reference", credit_tol=0.1)
