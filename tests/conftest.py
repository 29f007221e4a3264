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
