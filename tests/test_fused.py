"""The reference engine's fast path (``sab.fused``) computes what the generic per-step graph
computes: the same selections, the same forward and gradients to float64 rounding (its C++
sparse read sums in its own order; with ``SAB_NATIVE=0`` the forwards are equal bit for bit,
``tests/test_native.py``)."""
import pytest
import torch

import sab
from sab.engines import forward_backward

from conftest import assert_forward_close, assert_grads_close, param_grads

CONFIGS = [
    dict(k_trunc=3, k_top=2, k_att=1),  # SPEC §3's credit: scores into ĥ and the memories
    dict(k_trunc=None, k_top=4, k_att=2, att_eps=0.05),
    dict(k_trunc=1, k_top=1, k_att=1, max_memories=3),
    dict(k_trunc=3, k_top=2, k_att=2, block_score_grad=True),
    dict(k_trunc=5, k_top=5, k_att=2, block_score_grad=True, delta_grad=True, att_eps=0.01),
    dict(k_trunc=2, k_top=3, k_att=1, block_score_grad=True, delta_grad=True, max_memories=4,
         num_layers=2),
    dict(k_trunc=4, k_top=2, k_att=3, num_layers=3, att_hidden=3),
]


def run(kw, fast, chunks, carry_graph, seed, dtype=torch.float64):
    """Outputs, summaries, records and parameter gradients of a layer run over ``chunks``
    (lengths) with the state carried — with its graph (one backward over every chunk) or
    detached between chunks."""
    torch.manual_seed(seed)
    layer = sab.SABLSTM(3, 5, **kw).to(dtype)
    layer.fast_path = fast
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(sum(chunks), 2, 3, dtype=dtype, generator=g, requires_grad=True)
    r = torch.randn(sum(chunks), 2, 5, dtype=dtype, generator=g)
    state, outs, recs, t0 = None, [], [], 0
    for n in chunks:
        out, state, rec = layer(x[t0:t0 + n], state, return_attention=True)
        outs.append(out + 0.5 * rec[-1].summary)  # the loss reads h(t) and s(t)
        recs += rec
        state = state if carry_graph else state.detach()
        t0 += n
    loss = (torch.cat(outs) * r).sum() + state.c.pow(2).sum()
    loss.backward()
    return torch.cat(outs).detach(), recs, param_grads(layer), x.grad


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("chunks,carry_graph", [((17,), True), ((7, 10), True), ((7, 10), False)])
def test_fused_layer_equals_the_generic_graph(kw, chunks, carry_graph):
    seed = len(str(kw)) + len(chunks)
    out_f, recs_f, grads_f, gx_f = run(kw, True, chunks, carry_graph, seed)
    out_g, recs_g, grads_g, gx_g = run(kw, False, chunks, carry_graph, seed)
    assert_forward_close(out_f, out_g)
    for a, b in zip(recs_f, recs_g):
        assert torch.equal(a.indices, b.indices)  # the same memories selected
        assert torch.equal(a.memory_steps, b.memory_steps)
        assert_forward_close(a.summary, b.summary)
        assert_forward_close(a.weights, b.weights)
    assert_grads_close(gx_f, gx_g)
    for name in grads_g:
        assert_grads_close(grads_f[name], grads_g[name], msg=name)


def test_self_attention_baseline_takes_the_fast_path_too():
    torch.manual_seed(0)
    x = torch.randn(12, 2, 3, dtype=torch.float64)
    grads = {}
    for fast in (True, False):
        torch.manual_seed(1)
        layer = sab.SelfAttnLSTM(3, 4).double()
        layer.fast_path = fast
        out, _ = layer(x)
        out.pow(2).sum().backward()
        grads[fast] = param_grads(layer)
    for name in grads[False]:
        assert_grads_close(grads[True][name], grads[False][name], msg=name)


def test_training_uses_one_autograd_node_per_layer_and_chunk():
    layer = sab.SABLSTM(3, 5, k_trunc=3, k_top=2, k_att=2, num_layers=2,
                        block_score_grad=True, delta_grad=True)
    out, _ = layer(torch.randn(20, 2, 3))
    names, stack, seen = [], [out.grad_fn], set()
    while stack:  # every node of the graph
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack += [f for f, _ in fn.next_functions]
    assert names.count("_FusedLayerBackward") == 2
    assert "_LSTMPointwiseBackward" not in names and "_GatherBackward" not in names


def test_the_sparse_engine_runs_its_blocks_through_the_one_node_layer(monkeypatch):
    """The sparse engine's graph-free forward runs ``fused_forward`` (no node), and each block
    it visits is recomputed through the one-node layer, replaying the logged rankings."""
    import sab.layer

    calls, forwards = [], []

    def spy(*args):
        calls.append(args[-1])  # the replay
        return fused_layer(*args)

    def spy_forward(*args):
        forwards.append(args[-2])  # the log
        return fused_forward(*args)

    fused_layer, fused_forward = sab.fused.fused_layer, sab.fused.fused_forward
    monkeypatch.setattr(sab.layer, "fused_layer", spy)
    monkeypatch.setattr(sab.layer, "fused_forward", spy_forward)
    layer = sab.SABLSTM(3, 5, k_trunc=3, k_top=2, k_att=1, block_score_grad=True)
    x = torch.randn(9, 2, 3)
    res = forward_backward(layer, x, lambda a, b, o, s: o.sum(), engine="sparse")
    assert torch.isfinite(res.loss)
    assert len(forwards) == 1 and forwards[0] is not None
    assert len(calls) == res.stats["steps_backpropagated"] // 3  # one call per visited block
    assert all(r is not None for r in calls)


@pytest.mark.parametrize("kw", CONFIGS)
def test_forward_without_autograd_equals_the_generic_loop(kw):
    """Evaluation (no autograd) through ``fused_forward`` computes the generic loop's forward:
    the same selections; outputs, records, the final state and memory to float64 rounding, over
    two chunks."""
    results = {}
    for fast in (True, False):
        torch.manual_seed(5)
        layer = sab.SABLSTM(3, 5, **kw).double()
        layer.fast_path = fast
        x = torch.randn(13, 2, 3, dtype=torch.float64)
        with torch.no_grad():
            out1, st, rec1 = layer(x[:6], return_attention=True)
            out2, st, rec2 = layer(x[6:], st, return_attention=True)
        results[fast] = (torch.cat([out1, out2]), rec1 + rec2, st)
    (out_f, recs_f, st_f), (out_g, recs_g, st_g) = results[True], results[False]
    assert_forward_close(out_f, out_g)
    for a, b in zip(recs_f, recs_g):
        for f in ("indices", "memory_steps"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        for f in ("summary", "weights"):
            assert_forward_close(getattr(a, f), getattr(b, f), msg=f)
    assert_forward_close(st_f.h, st_g.h)
    assert_forward_close(st_f.c, st_g.c)
    for m_f, m_g in zip(st_f.memory, st_g.memory):
        if m_f is not None:
            a, b = m_f.chronological(), m_g.chronological()
            assert a.count == b.count
            assert_forward_close(a.values[:, :a.count], b.values[:, :b.count])
            assert_forward_close(a.keys[:, :a.count], b.keys[:, :b.count])


@pytest.mark.parametrize("kw", CONFIGS)
def test_sparse_engine_recomputes_blocks_through_the_one_node_layer(kw):
    """The sparse engine with the one-node layer for its recomputations gives the gradients of
    the per-step graph's recomputations (and both those of the reference engine,
    ``tests/test_engines.py``), with carried state and memory."""
    if kw.get("k_trunc") is None:
        kw = dict(kw, k_trunc=6)  # the engine needs blocks
    grads = {}
    for fast in (True, False):
        torch.manual_seed(3)
        layer = sab.SABLSTM(3, 5, **kw).double()
        layer.fast_path = fast
        g = torch.Generator().manual_seed(4)
        x = torch.randn(13, 2, 3, dtype=torch.float64, generator=g)
        r = torch.randn(13, 2, 5, dtype=torch.float64, generator=g)
        state = None
        for lo, hi in ((0, 6), (6, 13)):  # state and memory carried (detached) into chunk 2
            res = forward_backward(layer, x[lo:hi], lambda a, b, o, s: ((o + s) * r[lo + a:lo + b]).sum(),
                                   state, engine="sparse")
            state = res.state
        grads[fast] = param_grads(layer)
    for name in grads[False]:
        assert_grads_close(grads[True][name], grads[False][name], msg=name)


def test_a_training_step_leaves_nothing_behind(monkeypatch):
    """The node's buffers die with the graph, by reference counting alone: the bank holds the
    node's token, so a reference from the node back to the bank made a cycle through autograd's
    C++ nodes that only a full garbage collection could free — in training it leaked every
    step's activations (~15 MB a step at T=100, B=64)."""
    import weakref

    import sab.fused

    kept = []
    apply = sab.fused._FusedLayer.apply

    def spy(*args):
        outs = apply(*args)
        kept.append(weakref.ref(outs[0].grad_fn.acts[0]))  # a buffer kept for the backward
        return outs

    monkeypatch.setattr(sab.fused._FusedLayer, "apply", spy)
    layer = sab.SABLSTM(3, 5, k_trunc=3, k_top=2, k_att=1, block_score_grad=True)
    for _ in range(3):  # training steps as the trainer runs them
        layer.zero_grad()
        forward_backward(layer, torch.randn(10, 2, 3), lambda a, b, o, s: o.sum())
    assert len(kept) == 3
    assert all(k() is None for k in kept)
