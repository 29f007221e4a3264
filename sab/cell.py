"""One SAB step (SPEC §2.1, §2.3–2.6): the LSTM cell, then sparse attention over the memory.

Pure functions of tensors and modules; the layer (``sab.layer``) loops them over time.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .memory import MemoryBank
from .sparsifier import threshold_weights

__all__ = ["lstm_pointwise", "attend", "Attention", "Selection"]


def lstm_pointwise(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``gates`` (B, 4H) = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh, gate order i, f, g, o as nn.LSTM."""
    i, f, g, o = gates.chunk(4, dim=1)  # 4 × (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
    h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
    return h, c


class Selection(NamedTuple):
    """What the ranking of one step chose: replayed when the sparse engine recomputes a block."""
    top: Tensor  # (B, k+1)  the k_top best scores and δ, sorted
    slots: Tensor  # (B, k)  slots of the k_top best memories


class Attention(NamedTuple):
    summary: Tensor  # (B, H)  s(t)
    weights: Tensor  # (B, m)  weights of the read memories
    slots: Tensor  # (B, m)  their slots in the bank
    selection: Optional[Selection]  # None when every memory was read (n <= k_top, dense)


def attend(scorer, h_hat: Tensor, bank: MemoryBank, k_top: int, dense: bool = False,
           selection: Optional[Selection] = None, eps: float = 0.0,
           block_score_grad: bool = False) -> Attention:
    """Summary ``s(t) = Σ_i w_i m_i`` over the memory (SPEC §2.3–2.5).

    Sparse (``dense=False``) with ``n > k_top``: every memory is scored without a graph (the scores
    of the unselected memories get no credit anyway: they fall below the stop-gradient threshold
    δ), the ``k_top`` best are gathered from the bank and re-scored with a graph, so the forward
    and backward cost of the summary is O(B·k_top·H) and credit flows to those memories alone.
    ``n ≤ k_top`` or ``dense=True`` (the self-attention baseline): softmax over all ``n``.
    ``selection``: the ranking this step made before (the sparse engine's recomputation replays
    it instead of scoring every memory again).  ``block_score_grad``: the query reads ĥ detached
    (the bank's keys were then written from detached memories), so the scores send gradient to
    the scorer's parameters only.
    """
    start, stop = bank.window()
    n = stop - start
    query = scorer.query(h_hat.detach() if block_score_grad else h_hat)  # (B, d_k)
    if dense or n <= k_top:
        values, keys = bank.gather_all()  # (B, n, H), (B, n, d_k)
        weights = torch.softmax(scorer.scores(query, keys), dim=-1)  # (B, n)
        slots = torch.arange(start, stop, device=h_hat.device).expand(h_hat.shape[0], -1)
        selection = None
    else:
        if selection is None:
            with torch.no_grad():
                top, slots = scorer.rank(query, bank.keys[:, start:stop], k_top + 1)  # (B, k+1)
            selection = Selection(top, slots[:, :k_top] + start)
        top, slots = selection  # (B, k+1), (B, k)
        values, keys = bank.gather(slots)  # (B, k, H), (B, k, d_k)
        scores = scorer.scores(query, keys)  # (B, k) with graph
        # Forward values exactly those that were ranked; gradient of the re-scored ones.
        scores = scores - scores.detach() + top[:, :k_top]
        weights = threshold_weights(scores, top[:, k_top], eps)  # (B, k), δ stop-gradient
    summary = (weights.unsqueeze(1) @ values).squeeze(1)  # (B, 1, m) @ (B, m, H) -> (B, H)
    return Attention(summary, weights, slots, selection)
