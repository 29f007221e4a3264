"""SAB written straight from the definition, the way the authors' code is written (SPEC §2–§3).

Every step scores *all* memories with a graph, weights them densely and sums ``(B, n, H)``; the
memory is a Python list stacked anew at each step; keys are recomputed every step.  Time and memory
grow as T² (SPEC §9).  It exists for two reasons:

* tests compare :class:`sab.SABLSTM` against it, output for output and gradient for gradient (it
  shares no code with the layer: the definition, not our own outputs);
* benchmarks keep it as the "straightforward implementation" baseline.

It reads the parameters of a :class:`sab.SABLSTM` (MLP, dot or release scorer) and implements the same
rules — the k_top+1 threshold with stop-gradient, softmax while n ≤ k_top, block truncation, writes
after ``(t+1) % k_att == 0``, eviction of the oldest memory beyond ``max_memories``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


def _scores(layer_module, l: int, h_hat: Tensor, mems: Tensor) -> Tensor:
    """Raw scores of every memory: h_hat (B, H), mems (B, n, H) -> (B, n)."""
    scorer = layer_module.scorers[l]
    if layer_module.scorer_name == "release":
        w = scorer.linear.weight[0]  # (2H,)
        both = torch.cat([h_hat.unsqueeze(1).expand_as(mems), mems], dim=-1)  # (B, n, 2H)
        return torch.tanh(both) @ w + scorer.linear.bias  # (B, n)
    q = h_hat @ scorer.query_proj.weight.t() + scorer.query_proj.bias  # (B, d)
    k = mems @ scorer.key_proj.weight.t()  # (B, n, d), recomputed every step
    if layer_module.scorer_name == "dot":
        return (k * q.unsqueeze(1)).sum(-1) / scorer.key_size ** 0.5  # (B, n)
    return torch.tanh(q.unsqueeze(1) + k) @ scorer.v  # (B, n)


def _weights(scores: Tensor, k_top: int, dense: bool, eps: float = 0.0,
             delta_grad: bool = False) -> Tensor:
    n = scores.shape[-1]
    if dense or n <= k_top:
        return torch.softmax(scores, dim=-1)
    delta = scores.topk(k_top + 1, dim=-1).values[:, -1:]  # (B, 1)
    delta = delta if delta_grad else delta.detach()  # stop-gradient unless delta_grad
    shifted = torch.relu(scores - delta)  # (B, n)
    total = shifted.sum(-1, keepdim=True)
    if eps > 0:
        return shifted / (total + eps)
    return shifted / torch.where(total > 0, total, torch.ones_like(total))


def naive_forward(layer, x: Tensor, h0: Optional[Tensor] = None, c0: Optional[Tensor] = None,
                  memories: Optional[List[List[Tensor]]] = None, step0: int = 0):
    """Run ``layer``'s parameters over time-major ``x`` (T, B, I) by the definition.

    Returns ``output`` (T, B, H), ``h``, ``c`` (L, B, H), ``memories`` (per layer, a list of
    (B, H) tensors in write order) and ``summaries`` (per layer, (T, B, H)).
    """
    T, B, _ = x.shape
    L, H = layer.num_layers, layer.hidden_size
    h0 = x.new_zeros(L, B, H) if h0 is None else h0
    c0 = x.new_zeros(L, B, H) if c0 is None else c0
    memories = [[] for _ in range(L)] if memories is None else [list(m) for m in memories]
    attends = layer.dense or layer.k_top > 0
    hs, cs, summaries = [], [], []
    inp = x
    for l in range(L):
        w_ih, w_hh, b_ih, b_hh = layer.cell_weights(l)
        h, c, mems, outs, sums = h0[l], c0[l], memories[l], [], []
        for t in range(T):
            g = step0 + t
            if layer.k_trunc is not None and g % layer.k_trunc == 0:
                h, c = h.detach(), c.detach()
            gates = inp[t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh  # (B, 4H)
            i, f, gg, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h_hat = torch.sigmoid(o) * torch.tanh(c)
            s = torch.zeros_like(h_hat)
            if attends and mems:
                M = torch.stack(mems, dim=1)  # (B, n, H): O(n) every step
                if layer.block_score_grad:  # the scorer reads detached states
                    scores = _scores(layer, l, h_hat.detach(), M.detach())
                else:
                    scores = _scores(layer, l, h_hat, M)
                w = _weights(scores, layer.k_top, layer.dense, layer.att_eps,
                             layer.delta_grad)  # (B, n)
                s = (w.unsqueeze(-1) * M).sum(1)  # dense sum over all n memories
            h = h_hat + s
            if attends and (g + 1) % layer.k_att == 0:
                mems.append(h)
                if layer.max_memories is not None and len(mems) > layer.max_memories:
                    mems.pop(0)  # evict the oldest
            outs.append(h)
            sums.append(s)
        inp = torch.stack(outs)  # (T, B, H)
        hs.append(h)
        cs.append(c)
        summaries.append(torch.stack(sums))
        memories[l] = mems
    return inp, torch.stack(hs), torch.stack(cs), memories, summaries
