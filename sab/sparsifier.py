"""The sparsifier of SPEC §2.4: keep exactly ``k_top`` memories.

Rule, for raw scores ``a`` over ``n`` memories (last dimension):

* ``n > k_top``: ``δ = (k_top+1)-th largest a``, held constant in the backward pass (stop-gradient),
  ``ã_i = relu(a_i − δ)``, ``w_i = ã_i / Σ_j ã_j``.  Exactly the ``k_top`` largest scores can get
  non-zero weight.  ``relu`` (not ``clamp_min``) because its gradient at exactly 0 is 0: the
  (k_top+1)-th score sits at ``a − δ = 0`` and must receive no credit (SPEC §3).
* ``n ≤ k_top``: nothing to threshold, all ``n`` memories are kept with ``w = softmax(a)``, a smooth
  function of the scores whose weights are non-negative and sum to 1.  (The authors' release used
  the raw, signed, unnormalised scores here — SPEC §8.3 — which made training diverge.)

Normalisation.  The paper writes ``ã_i / (Σ_j ã_j + ε)``; ε only guards the division by zero.  We
guard it with a mask instead, so the weights sum to exactly 1 whenever any memory is kept.  They
are all zero only when the top ``k_top`` scores tie with the (k_top+1)-th (then ``ã ≡ 0``, the
summary is 0 and no memory gets credit).  Weights are never NaN; non-finite scores are rejected.

Invariances: adding a constant to all scores changes nothing (δ moves with them; softmax is shift
invariant).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sparsify", "topk_select", "threshold_weights", "threshold_forward",
           "threshold_weights_grad", "threshold_grad", "threshold_delta_grad"]


def threshold_weights(top: Tensor, delta: Tensor, eps: float = 0.0,
                      delta_grad: bool = False) -> Tensor:
    """Weights of the kept scores ``top`` (..., k) given the threshold ``delta`` (...).

    ``delta`` is detached here: it is a constant for the backward pass (SPEC §2.4).  ``eps > 0``
    gives the paper's ``ã / (Σ ã + ε)``: weights then sum to ``Σã / (Σã + ε)`` and fade out
    smoothly as the kept scores approach the threshold, which bounds ``∂w/∂a`` by ``~2/ε``.
    ``delta_grad=True`` keeps δ's gradient (the true derivative of the weights where the ranking
    is constant); the caller must make sure it reaches no memory (``SABLSTM(delta_grad=True)``).
    """
    delta = delta if delta_grad else delta.detach()
    return threshold_forward(top, delta, eps)[0]


def threshold_forward(top: Tensor, delta: Tensor, eps: float = 0.0
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`threshold_weights` (δ as given) with what :func:`threshold_grad` needs: the
    weights (..., k), ``ã = relu(top − δ)`` (..., k) and the denominator (..., 1)."""
    shifted = torch.relu(top - delta.unsqueeze(-1))  # (..., k), zero gradient at 0
    denom = _denominator(shifted, eps)
    return shifted / denom, shifted, denom  # the weights sum to 1 (eps=0) or are all zero


def _denominator(shifted: Tensor, eps: float) -> Tensor:
    """``Σã + ε`` of the non-negative ``shifted`` scores (..., k) → (..., 1); with ``ε = 0``,
    ``Σã`` guarded by 1 where it is 0 (all kept scores tie with δ: the weights are all zero)."""
    total = shifted.sum(-1, keepdim=True)
    if eps > 0:
        return total + eps
    return torch.where(total > 0, total, 1.0)


def threshold_weights_grad(grad: Tensor, top: Tensor, delta: Tensor, weights: Tensor,
                           eps: float = 0.0) -> Tensor:
    """The backward of :func:`threshold_weights` written out: ``∂L/∂top`` (..., k) from
    ``∂L/∂w`` (..., k), with δ constant.

    ``w_i = ã_i / D`` with ``D = Σã + ε`` (or ``Σã``, 1 when that is 0) gives
    ``∂L/∂ã_j = (g_j − Σ_i g_i w_i) / D``, and ``relu`` passes it where ``top − δ > 0`` only.
    """
    shifted = torch.relu(top - delta.unsqueeze(-1))  # (..., k)
    return threshold_grad(grad, weights, shifted, _denominator(shifted, eps))


def threshold_grad(grad: Tensor, weights: Tensor, shifted: Tensor, denom: Tensor) -> Tensor:
    """:func:`threshold_weights_grad` from what :func:`threshold_forward` returned."""
    g = (grad - (grad * weights).sum(-1, keepdim=True)) / denom
    return torch.where(shifted > 0, g, 0.0)  # relu passes nothing where ã = 0


def threshold_delta_grad(grad_top: Tensor) -> Tensor:
    """``∂L/∂δ`` (..., 1) from ``∂L/∂top`` (..., k) as :func:`threshold_weights_grad` returns it:
    every kept score above δ enters as ``top_i − δ`` (the others carry a zero already), so
    ``∂L/∂δ = −Σ_i ∂L/∂top_i``."""
    return -grad_top.sum(-1, keepdim=True)


def topk_select(scores: Tensor, k_top: int, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Sparse form of :func:`sparsify`: the weights and indices of the kept memories.

    ``scores`` (..., n) → ``weights`` (..., m), ``indices`` (..., m) with ``m = min(k_top, n)``,
    indices sorted by decreasing score.  Gradient reaches only the kept scores.
    """
    _check_scores(scores, k_top)
    n = scores.shape[-1]
    if k_top == 0 or n == 0:
        empty = scores.new_zeros(scores.shape[:-1] + (0,))
        return empty, empty.long()
    if n <= k_top:
        return torch.softmax(scores, dim=-1), _arange_like(scores)
    values, indices = scores.topk(k_top + 1, dim=-1, sorted=True)  # (..., k+1)
    delta = values[..., k_top]  # (...,) the (k_top+1)-th largest score
    return threshold_weights(values[..., :k_top], delta, eps), indices[..., :k_top]


def sparsify(scores: Tensor, k_top: int, eps: float = 0.0) -> Tensor:
    """Dense sparse attention weights over the last dimension (SPEC §2.4).

    ``scores`` (..., n) → weights (..., n) with at most ``k_top`` non-zero entries, non-negative,
    summing to 1 (or all zero when the top scores tie with the (k_top+1)-th, see module docs).
    """
    weights, indices = topk_select(scores, k_top, eps)  # (..., m), (..., m)
    return torch.zeros_like(scores).scatter(-1, indices, weights)  # (..., n)


def _arange_like(scores: Tensor) -> Tensor:
    n = scores.shape[-1]
    return torch.arange(n, device=scores.device).expand(scores.shape)  # (..., n)


def _check_scores(scores: Tensor, k_top: int) -> None:
    if not isinstance(k_top, int) or isinstance(k_top, bool) or k_top < 0:
        raise ValueError(f"k_top must be an integer >= 0, got {k_top!r}")
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {type(scores).__name__}"
                        f"{'' if not torch.is_tensor(scores) else ' of dtype ' + str(scores.dtype)}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (..., n), got a scalar")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite; got NaN or infinity")
