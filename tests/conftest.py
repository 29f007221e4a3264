import pytest
import torch


def make_sab(input_size=3, hidden=5, dtype=torch.float64, seed=0, **kw):
    import sab
    torch.manual_seed(seed)
    kw.setdefault("k_trunc", 3)
    kw.setdefault("k_top", 2)
    kw.setdefault("k_att", 2)
    return sab.SABLSTM(input_size, hidden, **kw).to(dtype)


def param_grads(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in module.named_parameters()}


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def assert_forward_close(got, want, rel=1e-12, msg=None):
    """Forward values (outputs, summaries, weights, states) of two implementations of the same
    steps that sum in different orders (the C++ sparse read against the Python one): equal to
    float64 rounding, ``rel`` of the tensor's scale."""
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale, msg=msg)


def assert_grads_close(got, want, rel=1e-10, msg=None):
    """Gradients equal to float64 rounding: every entry within ``rel`` of the tensor's scale
    (``rel · max(1, max|want|)``) and of itself.  An entrywise relative test alone is too strict
    where a small entry of a large gradient carries rounding amplified by near-ties of the
    attention scores (ε = 0), which any reordering of the same sums changes."""
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale, msg=msg)

