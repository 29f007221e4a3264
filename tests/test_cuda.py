"""CUDA: the same model on the GPU gives the CPU's outputs and gradients (skipped without CUDA)."""
import pytest
import torch

import sab
from sab.engines import forward_backward

from conftest import make_sab, param_grads

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def loss_every(r):
    return lambda s, e, out, summ: (out * r[s:e]).sum() + (summ * r[s:e]).pow(2).sum()


@pytest.mark.parametrize("engine", ["reference", "sparse"])
@pytest.mark.parametrize("kw", [dict(k_trunc=3, k_top=2, k_att=2),
                                dict(k_trunc=4, k_top=3, k_att=1, num_layers=2,
                                     max_memories=5)])
def test_cuda_equals_cpu_float64(engine, kw):
    T, B, I, H = 40, 4, 3, 8
    cpu = make_sab(I, H, **kw)
    gpu = make_sab(I, H, **kw).cuda()
    x = torch.randn(T, B, I, dtype=torch.float64)
    r = torch.randn(T, B, H, dtype=torch.float64)
    res_c = forward_backward(cpu, x, loss_every(r), engine=engine)
    res_g = forward_backward(gpu, x.cuda(), loss_every(r.cuda()), engine=engine)
    torch.testing.assert_close(res_g.loss.cpu(), res_c.loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res_g.state.h.cpu(), res_c.state.h, rtol=1e-10, atol=1e-10)
    gc, gg = param_grads(cpu), param_grads(gpu)
    for name in gc:
        torch.testing.assert_close(gg[name].cpu(), gc[name], rtol=1e-8, atol=1e-10, msg=name)


def test_engines_agree_on_cuda_float32():
    T, B, I, H = 60, 8, 3, 16
    layer = make_sab(I, H, dtype=torch.float32, k_trunc=5, k_top=3, k_att=2).cuda()
    x = torch.randn(T, B, I, device="cuda")
    r = torch.randn(T, B, H, device="cuda")
    grads = {}
    for engine in ("reference", "sparse"):
        layer.zero_grad()
        forward_backward(layer, x, loss_every(r), engine=engine)
        grads[engine] = param_grads(layer)
    for name in grads["reference"]:  # float32, summed in another order: 1e-5 relative (SPEC §4)
        ref, got = grads["reference"][name], grads["sparse"][name]
        rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        assert rel < 1e-5, (name, rel)


@pytest.mark.parametrize("model", ["sab", "lstm", "tbptt", "selfattn"])
def test_every_model_on_cuda(model):
    kw = dict(sab=dict(k_trunc=3, k_top=2, k_att=2, fused_scorer=False),
              tbptt=dict(k_trunc=3)).get(model, {})
    rnn = sab.build_rnn(model, 3, 8, num_layers=2, **kw).cuda()
    x = torch.randn(20, 4, 3, device="cuda")
    out, state = rnn(x)
    out.sum().backward()
    assert out.is_cuda and state.h.is_cuda
    assert all(p.grad is not None and p.grad.is_cuda for p in rnn.parameters())
    with torch.no_grad():
        out2, _ = rnn(x, state.detach())
    assert out2.shape == (20, 4, 8)
