"""The attention map's matrix (``sab.plots.attention_matrix``) against its definition: entry
(i, t) is the weight step t gave the memory written at step ``written[i]``, and a memory enters
the map only when some step read it with a positive weight."""
import torch

from sab.plots import attention_matrix
from sab.state import AttentionRecord

from conftest import make_sab


def _record(weights, steps):
    w = torch.tensor(weights, dtype=torch.float64)[:, None]  # (T, 1, K)
    s = torch.tensor(steps)[:, None]
    return AttentionRecord(summary=torch.zeros(w.shape[0], 1, 1), weights=w, indices=s,
                           memory_steps=s)


def test_entries_are_the_weights_each_step_gave_each_memory():
    rec = _record([[0.0, 0.0], [1.0, 0.0], [0.25, 0.75], [0.6, 0.4]],
                  [[-1, -1], [1, -1], [1, 3], [5, 1]])
    mat, written = attention_matrix(rec)
    assert written.tolist() == [1, 3, 5]
    want = torch.tensor([[0.0, 1.0, 0.25, 0.4],
                         [0.0, 0.0, 0.75, 0.0],
                         [0.0, 0.0, 0.0, 0.6]])
    torch.testing.assert_close(mat, want.float())


def test_a_memory_selected_at_weight_zero_is_not_drawn():
    """k_top = 2, memories 3 and 5 tied behind memory 1: whichever of the two top-k picks has the
    score δ, so ã = 0 (SPEC §2.4); the pick is the kernel's choice and the map must not show it."""
    a = _record([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], [[-1, -1], [1, 3], [1, 5]])
    b = _record([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], [[-1, -1], [1, 5], [1, 3]])
    for rec in (a, b):
        mat, written = attention_matrix(rec)
        assert written.tolist() == [1]
        torch.testing.assert_close(mat, torch.tensor([[0.0, 1.0, 1.0]]))


def test_a_layers_map_keeps_every_positive_weight():
    """On a real layer's record each column sums to the weights that step gave (0 before the
    first write), every drawn row has some weight, and every memory read with weight is drawn."""
    layer = make_sab(k_top=2, k_att=1)
    x = torch.randn(12, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, (rec,) = layer(x, return_attention=True)
    for sample in range(3):
        mat, written = attention_matrix(rec, sample)
        w = rec.weights[:, sample]
        torch.testing.assert_close(mat.sum(0), w.sum(-1).float())
        assert (mat.sum(1) > 0).all()
        assert len(written) == len(torch.unique(rec.memory_steps[:, sample][w > 0]))
