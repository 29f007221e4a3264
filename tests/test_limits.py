"""The exact limits of SPEC §3: attention off is TBPTT; nothing cut or thresholded is the true
derivative; and the layer equals the definition (sab.naive) in every regime."""
import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import sab
from sab.naive import naive_forward

from conftest import assert_grads_close, make_sab, param_grads


def tbptt_lstmcell(cells, x, k_trunc, step0=0):
    """TBPTT LSTM from nn.LSTMCell, straight from the definition (block truncation)."""
    T, B, _ = x.shape
    inp = x
    for cell in cells:
        h = x.new_zeros(B, cell.hidden_size)
        c = x.new_zeros(B, cell.hidden_size)
        outs = []
        for t in range(T):
            if (step0 + t) % k_trunc == 0:
                h, c = h.detach(), c.detach()
            h, c = cell(inp[t], (h, c))
            outs.append(h)
        inp = torch.stack(outs)
    return inp


@pytest.mark.parametrize("k_trunc,num_layers", [(1, 1), (3, 1), (4, 2), (50, 2)])
def test_k_top_zero_is_exactly_tbptt(k_trunc, num_layers):
    T, B, I, H = 17, 3, 4, 6
    layer = make_sab(I, H, k_trunc=k_trunc, k_top=0, k_att=2, num_layers=num_layers)
    cells = torch.nn.ModuleList(torch.nn.LSTMCell(I if l == 0 else H, H).double()
                                for l in range(num_layers))
    with torch.no_grad():
        for l, cell in enumerate(cells):
            for src, dst in zip(layer.cell_weights(l), (cell.weight_ih, cell.weight_hh,
                                                        cell.bias_ih, cell.bias_hh)):
                dst.copy_(src)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    r = torch.randn(T, B, H, dtype=torch.float64)
    out, _ = layer(x)
    ref = tbptt_lstmcell(cells, x, k_trunc)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    gx, = torch.autograd.grad((out * r).sum(), x, retain_graph=True)
    (out * r).sum().backward()
    gref, = torch.autograd.grad((ref * r).sum(), x, retain_graph=True)
    (ref * r).sum().backward()
    torch.testing.assert_close(gx, gref, rtol=0, atol=1e-12)
    for l, cell in enumerate(cells):
        for src, dst in zip(layer.cell_weights(l), (cell.weight_ih, cell.weight_hh,
                                                    cell.bias_ih, cell.bias_hh)):
            torch.testing.assert_close(src.grad, dst.grad, rtol=0, atol=1e-12)
    # the fused baseline is the same model
    tb = sab.TBPTTLSTM(I, H, k_trunc=k_trunc, num_layers=num_layers).double()
    with torch.no_grad():
        for l in range(num_layers):
            for name, src in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                                 layer.cell_weights(l)):
                getattr(tb.lstm, f"{name}_l{l}").copy_(src)
    out_tb, _ = tb(x)
    torch.testing.assert_close(out_tb, ref, rtol=0, atol=1e-12)
    (out_tb * r).sum().backward()
    for l in range(num_layers):
        for name, src in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                             layer.cell_weights(l)):
            torch.testing.assert_close(getattr(tb.lstm, f"{name}_l{l}").grad, src.grad,
                                       rtol=0, atol=1e-12)


@pytest.mark.parametrize("scorer", ["mlp", "dot", "release"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_nothing_cut_nothing_thresholded_is_the_true_derivative(scorer, num_layers):
    T, B, I, H, k_att = 7, 2, 2, 3, 2
    n_mem = T // k_att
    layer = make_sab(I, H, k_trunc=T, k_top=n_mem, k_att=k_att, num_layers=num_layers,
                     scorer=scorer, att_hidden=4)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        out, st = functional_call(layer, dict(zip(names, params)), (x,))
        return out, st.c

    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    assert gradcheck(f, (x,) + params, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(k_trunc=1, k_top=1, k_att=1),
    dict(k_trunc=3, k_top=2, k_att=2),
    dict(k_trunc=5, k_top=3, k_att=1, num_layers=2),
    dict(k_trunc=None, k_top=1, k_att=3),
    dict(k_trunc=2, k_top=2, k_att=1, max_memories=4),
    dict(k_trunc=4, k_top=2, k_att=2, scorer="release"),
    dict(k_trunc=3, k_top=2, k_att=1, scorer="dot", num_layers=2),
    dict(k_trunc=3, k_top=2, k_att=1, att_eps=0.05),
    dict(k_trunc=2, k_top=4, k_att=1, att_hidden=7, num_layers=3),
    dict(k_trunc=3, k_top=2, k_att=1, block_score_grad=True, num_layers=2),
    dict(k_trunc=4, k_top=3, k_att=2, block_score_grad=True, scorer="release"),
    dict(k_trunc=3, k_top=2, k_att=1, block_score_grad=True, delta_grad=True, att_eps=0.05,
         num_layers=2),
    dict(k_trunc=4, k_top=3, k_att=2, block_score_grad=True, delta_grad=True, scorer="release"),
    dict(k_trunc=3, k_top=2, k_att=1, block_score_grad=True, delta_grad=True, scorer="dot"),
])
def test_equals_the_definition_outputs_and_gradients(kw):
    T, B, I, H = 23, 3, 4, 5
    layer = make_sab(I, H, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    r = torch.randn(T, B, H, dtype=torch.float64)
    out, st, recs = layer(x, return_attention=True)
    (out * r).sum().backward()
    g_layer, gx = param_grads(layer), x.grad.clone()
    layer.zero_grad()
    x.grad = None
    ref, h, c, mems, sums = naive_forward(layer, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(st.h, h, rtol=0, atol=1e-12)
    torch.testing.assert_close(st.c, c, rtol=0, atol=1e-12)
    for l in range(layer.num_layers):
        torch.testing.assert_close(recs[l].summary, sums[l], rtol=0, atol=1e-12)
        torch.testing.assert_close(st.memory[l].memories(), torch.stack(mems[l], 1),
                                   rtol=0, atol=1e-12)
    (ref * r).sum().backward()
    assert_grads_close(gx, x.grad)
    for name, g in param_grads(layer).items():
        assert_grads_close(g_layer[name], g, msg=name)


def test_self_attention_baseline_equals_the_definition():
    T, B, I, H = 15, 2, 3, 4
    torch.manual_seed(3)
    layer = sab.SelfAttnLSTM(I, H, num_layers=2).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x)
    ref = naive_forward(layer, x)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g1, = torch.autograd.grad(out.pow(2).sum(), x)
    g2, = torch.autograd.grad(ref.pow(2).sum(), x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-11)


def test_attention_depends_on_the_current_state():
    """Changing ĥ changes the weights with the MLP scorer; with the release's it cannot."""
    torch.manual_seed(0)
    H, B, n, k = 6, 1, 9, 3
    from sab.cell import attend
    from sab.memory import MemoryBank
    for name, should_change in (("mlp", True), ("release", False)):
        layer = make_sab(2, H, k_top=k, scorer=name)
        scorer = layer.scorers[0]
        bank = MemoryBank.empty(B, H, scorer.key_size, dtype=torch.float64)
        with torch.no_grad():
            for i in range(n):
                m = torch.randn(B, H, dtype=torch.float64)
                bank.write(m, scorer.keys(m), i)
            changed = False
            for _ in range(20):
                a = attend(scorer, torch.randn(B, H, dtype=torch.float64), bank, k)
                b = attend(scorer, torch.randn(B, H, dtype=torch.float64), bank, k)
                wa = torch.zeros(B, n, dtype=torch.float64).scatter(1, a.slots, a.weights)
                wb = torch.zeros(B, n, dtype=torch.float64).scatter(1, b.slots, b.weights)
                changed |= not torch.allclose(wa, wb, atol=1e-12)
        assert changed == should_change, name


def test_fused_scorer_equals_eager():
    """The torch.compile'd ranking kernel selects the same memories with the same scores."""
    T, B, I, H = 30, 4, 3, 6
    eager = make_sab(I, H, k_trunc=4, k_top=3, k_att=1)
    fused = make_sab(I, H, k_trunc=4, k_top=3, k_att=1, fused_scorer=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    out_e, _, (rec_e,) = eager(x, return_attention=True)
    out_f, _, (rec_f,) = fused(x, return_attention=True)
    assert torch.equal(rec_e.indices, rec_f.indices)
    torch.testing.assert_close(out_f, out_e, rtol=0, atol=1e-12)
    out_e.pow(2).sum().backward()
    out_f.pow(2).sum().backward()
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_lstm_pointwise_equals_the_textbook_formula_and_finite_differences():
    """The cell's one-node pointwise step (hand-written backward) against the formula written
    out with autograd, values and gradients, and against finite differences."""
    from sab.cell import lstm_pointwise
    g = torch.Generator().manual_seed(0)
    gates = (3 * torch.randn(4, 4 * 6, dtype=torch.float64, generator=g)).requires_grad_()
    c = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    wh, wc = torch.randn(2, 4, 6, dtype=torch.float64, generator=g)

    def textbook(gates, c):
        i, f, gg, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        return torch.sigmoid(o) * torch.tanh(c), c

    for which in ((1, 1), (1, 0), (0, 1)):  # loss on h and c, h only, c only
        def loss(fn):
            h2, c2 = fn(gates, c)
            return (which[0] * wh * h2).sum() + (which[1] * wc * c2).sum()
        a = torch.autograd.grad(loss(lstm_pointwise), (gates, c))
        b = torch.autograd.grad(loss(textbook), (gates, c))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
    for x, y in zip(lstm_pointwise(gates, c), textbook(gates, c)):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)
    assert gradcheck(lstm_pointwise, (gates, c))


def test_tiled_ranking_equals_the_definition(monkeypatch):
    """The MLP ranking in batch tiles (one row per tile here) selects what the definition does."""
    import sab.scorer
    monkeypatch.setattr(sab.scorer, "RANK_TILE", 1)
    T, B, I, H = 17, 4, 3, 5
    layer = make_sab(I, H, k_trunc=3, k_top=2, k_att=1)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out, _ = layer(x)
    ref = naive_forward(layer, x)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
