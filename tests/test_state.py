"""Carried state: chunked equals whole, detaching, eviction, layouts (SPEC §2 last paragraph)."""
import pytest
import torch

import sab
from sab.naive import naive_forward

from conftest import make_sab, param_grads


@pytest.mark.parametrize("kw", [
    dict(k_trunc=3, k_top=2, k_att=2),
    dict(k_trunc=4, k_top=1, k_att=3, num_layers=2),
    dict(k_trunc=2, k_top=2, k_att=1, max_memories=5),
    dict(k_trunc=5, k_top=0, k_att=1),
])
@pytest.mark.parametrize("cuts", [(7, 16), (1, 2, 3, 23), (11,)])
def test_chunked_equals_whole(kw, cuts):
    T, B, I, H = 25, 3, 2, 4
    layer = make_sab(I, H, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    r = torch.randn(T, B, H, dtype=torch.float64)
    whole, st_whole = layer(x)
    (whole * r).sum().backward()
    g_whole, gx_whole = param_grads(layer), x.grad.clone()
    layer.zero_grad()
    x.grad = None
    pieces, state, prev = [], None, 0
    for cut in cuts + (T,):
        out, state = layer(x[prev:cut], state)
        pieces.append(out)
        prev = cut
    chunked = torch.cat(pieces)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(state.h, st_whole.h, rtol=0, atol=1e-13)
    torch.testing.assert_close(state.c, st_whole.c, rtol=0, atol=1e-13)
    assert state.step == st_whole.step == T
    for a, b in zip(state.memory, st_whole.memory):
        if a is None:
            assert b is None
            continue
        assert a.next_id == b.next_id and len(a) == len(b)
        torch.testing.assert_close(a.memories(), b.memories(), rtol=0, atol=1e-13)
    # credit flows across chunks exactly as through the whole sequence
    (chunked * r).sum().backward()
    torch.testing.assert_close(x.grad, gx_whole, rtol=1e-10, atol=1e-12)
    for name, g in param_grads(layer).items():
        torch.testing.assert_close(g, g_whole[name], rtol=1e-10, atol=1e-12, msg=name)


def test_carried_state_detaches():
    layer = make_sab(2, 4, k_trunc=50, k_top=2, k_att=1)
    x1 = torch.randn(10, 2, 2, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(10, 2, 2, dtype=torch.float64)
    _, state = layer(x1)
    assert state.h.requires_grad and state.memory[0].requires_grad
    cut = state.detach()
    assert not cut.h.requires_grad and not cut.c.requires_grad
    assert not cut.memory[0].requires_grad and len(cut.memory[0]) == 10
    torch.testing.assert_close(cut.memory[0].memories(), state.memory[0].memories())
    out, _ = layer(x2, cut)
    out.sum().backward()
    assert x1.grad is None  # nothing flowed into the previous chunk
    # the same values as the undetached continuation
    out2, _ = layer(x2, state)
    torch.testing.assert_close(out, out2)


def test_state_passed_twice_is_not_modified():
    layer = make_sab(2, 4, k_trunc=3, k_top=2, k_att=1)
    x = torch.randn(6, 2, 2, dtype=torch.float64)
    _, state = layer(x)
    n, ids = len(state.memory[0]), state.memory[0].ids().clone()
    a, _ = layer(x, state)
    b, _ = layer(x, state)
    torch.testing.assert_close(a, b)
    assert len(state.memory[0]) == n and torch.equal(state.memory[0].ids(), ids)


def test_max_memories_evicts_the_oldest():
    M, T = 4, 30
    layer = make_sab(2, 4, k_trunc=3, k_top=2, k_att=2, max_memories=M)
    x = torch.randn(T, 3, 2, dtype=torch.float64)
    out, state, (rec,) = layer(x, return_attention=True)
    bank = state.memory[0]
    assert len(bank) == M and bank.next_id == T // 2
    assert sorted(bank.ids().tolist()) == list(range(T // 2 - M, T // 2))
    # the memories kept are the last M written: h at steps 21, 23, ..., 29
    torch.testing.assert_close(bank.memories(), out[[T - 1 - 2 * i for i in reversed(range(M))]]
                               .transpose(0, 1))
    for t in range(T):  # a step never reads a memory evicted before it
        written = (t) // 2  # memories written before step t: ids 0 .. written-1
        sel = rec.indices[t][rec.indices[t] >= 0]
        assert (sel >= written - M).all() and (sel < written).all()
    ref = naive_forward(layer, x.transpose(0, 0))[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_batch_first_and_unbatched_layouts():
    layer = make_sab(3, 4, k_trunc=2, k_top=1, k_att=1)
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    ref, st_ref, (rec_ref,) = layer(x, return_attention=True)
    bf = make_sab(3, 4, k_trunc=2, k_top=1, k_att=1, batch_first=True)
    out, st, (rec,) = bf(x.transpose(0, 1), return_attention=True)
    torch.testing.assert_close(out, ref.transpose(0, 1))
    torch.testing.assert_close(st.h, st_ref.h)  # state stays (L, B, H), like nn.LSTM
    torch.testing.assert_close(rec.weights, rec_ref.weights.transpose(0, 1))
    one, st1 = layer(x[:, 0])  # unbatched (T, I)
    assert one.shape == (9, 4) and st1.h.shape == (1, 4)
    torch.testing.assert_close(one, ref[:, 0])
    two, _ = layer(x[:, 0], st1)  # unbatched state carries too
    assert two.shape == (9, 4)


def test_nn_lstm_style_unpacking_and_tuple_state():
    layer = make_sab(3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, (h, c) = layer(x)
    assert h.shape == c.shape == (1, 2, 4)
    out2, _ = layer(x, (h, c))  # an nn.LSTM (h, c) tuple is accepted: empty memory
    assert out2.shape == out.shape


@pytest.mark.parametrize("model", ["sab", "lstm", "tbptt", "selfattn"])
def test_float32_no_grad_inference(model):
    kw = dict(sab=dict(k_trunc=3, k_top=2, k_att=2), tbptt=dict(k_trunc=3)).get(model, {})
    torch.manual_seed(0)
    rnn = sab.build_rnn(model, 3, 8, num_layers=2, **kw)
    x = torch.randn(12, 4, 3)
    with torch.no_grad():
        out, state = rnn(x)
    assert out.dtype == torch.float32 and not out.requires_grad and out.shape == (12, 4, 8)
    out2, _ = rnn(x)
    torch.testing.assert_close(out, out2.detach())
    with torch.inference_mode():
        out3, _ = rnn(x)
    torch.testing.assert_close(out, out3)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    layer = sab.SABLSTM(3, 6, k_trunc=2, k_top=1, k_att=1, num_layers=2, dropout=0.5)
    x = torch.randn(8, 2, 3)
    layer.eval()
    a, _ = layer(x)
    b, _ = layer(x)
    torch.testing.assert_close(a, b)
    layer.train()
    c, _ = layer(x)
    assert not torch.allclose(a, c)
