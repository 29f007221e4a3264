"""One SAB step (SPEC §2.1, §2.3–2.6): the LSTM cell, then sparse attention over the memory.

Pure functions of tensors and modules; the layer (``sab.layer``) loops them over time.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import fastmath
from .memory import MemoryBank
from .scorer import MLPScorer, mlp_scores_grad
from .sparsifier import threshold_delta_grad, threshold_weights, threshold_weights_grad

__all__ = ["lstm_pointwise", "attend", "Attention", "Selection"]


def lstm_pointwise(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``gates`` (B, 4H) = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh, gate order i, f, g, o as nn.LSTM.

    Returns ``h``, ``c`` (B, H).  One autograd node with a hand-written backward (the graph of
    the plain formula has about ten nodes per step and a concatenation in its backward; at
    T=100 that bookkeeping costs as much as the arithmetic).  Tested against the textbook
    formula and finite differences in float64 (``tests/test_limits.py``).
    """
    if torch.is_grad_enabled() and (gates.requires_grad or c.requires_grad):
        return _LSTMPointwise.apply(gates, c)
    # without a graph: the same operations, rounding for rounding (the sparse engine's graph-free
    # forward must equal the reference engine's bit for bit)
    return pointwise_forward(gates, c)[:2]


def pointwise_forward(gates: Tensor, c_prev: Tensor):
    """``h``, ``c`` (B, H) of an LSTM step from its ``gates`` (B, 4H), with what the backward
    needs: the activations (B, 4H) and tanh(c) (B, H)."""
    act = gate_activations_(gates.clone())
    h, c, tc = cell_update(act, c_prev)
    return h, c, act, tc


def gate_activations_(gates: Tensor) -> Tensor:
    """In place: σ of the i, f, o quarters of ``gates`` (B, 4H) and tanh of the g quarter, as
    ``2·σ(2g) − 1`` (``sab.fastmath``).  The whole row goes through one ``sigmoid_`` (on a
    strided quarter PyTorch's CPU kernel rounds differently: every path must use this one)."""
    H = gates.shape[1] // 4
    g = gates[:, 2 * H:3 * H]
    g.mul_(2)
    gates.sigmoid_()
    g.mul_(2).sub_(1)
    return gates


def cell_update(act: Tensor, c_prev: Tensor, c: Optional[Tensor] = None,
                tc: Optional[Tensor] = None):
    """``c = f·c_prev + i·g``, ``h = o·tanh(c)`` from the activations (B, 4H): ``h``, ``c``,
    ``tanh(c)`` (B, H); ``c`` and ``tanh(c)`` into the given buffers if any (``h`` is always a
    fresh tensor: products read it, and MKL rounds differently on unaligned buffer rows)."""
    H = c_prev.shape[1]
    si, sf, tg, so = act.split(H, dim=1)
    c = torch.addcmul(sf * c_prev, si, tg) if c is None else \
        torch.addcmul(sf * c_prev, si, tg, out=c)
    tc = fastmath.tanh(c) if tc is None else fastmath.tanh(c, out=tc)
    return so * tc, c, tc


class _LSTMPointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates: Tensor, c_prev: Tensor):
        h, c, act, tc = pointwise_forward(gates, c_prev)
        ctx.save_for_backward(act, c_prev, tc)
        return h, c

    @staticmethod
    def backward(ctx, gh: Tensor, gc: Tensor):  # unused outputs arrive as zeros, never None
        return pointwise_backward(gh, gc, *ctx.saved_tensors)


def pointwise_backward(gh: Tensor, gc: Tensor, act: Tensor, c_prev: Tensor, tc: Tensor,
                       dgates: Optional[Tensor] = None):
    """The backward of one LSTM pointwise step: ``∂L/∂gates`` (B, 4H, into ``dgates`` if given)
    and ``∂L/∂c_prev`` (B, H) from ``∂L/∂h`` and ``∂L/∂c`` (B, H), given what
    ``pointwise_forward`` returned."""
    H = c_prev.shape[1]
    si, sf, tg, so = act.split(H, dim=1)
    if dgates is None:
        dgates = torch.empty_like(act)  # (B, 4H)
    # the gates' derivatives: σ(1 − σ) for i, f, o and 1 − tanh² for g
    deriv = (1 - act).mul_(act)
    torch.mul(tg, tg, out=deriv[:, 2 * H:3 * H]).neg_().add_(1)
    dc = gh * so  # dc = gc + gh·o·(1 − tanh²c)
    dc.mul_(1 - tc * tc).add_(gc)
    di, df, dg, do = dgates.split(H, dim=1)
    torch.mul(dc, tg, out=di)
    torch.mul(dc, c_prev, out=df)
    torch.mul(dc, si, out=dg)
    torch.mul(gh, tc, out=do)
    dgates.mul_(deriv)
    return dgates, dc * sf


class _MLPSparseWeights(torch.autograd.Function):
    """Weights of the k_top selected memories from their ranked scores ``top`` (B, k+1), with
    the gradient of the MLP scores ``a = v·tanh(query + keys)``: what ``attend`` computes with
    ``scorer.scores`` and ``threshold_weights`` (about fifteen autograd nodes per step), as one
    node.  Tests hold it to the definition in float64 (tests/test_limits.py, tests/test_engines.py).
    """

    @staticmethod
    def forward(ctx, query: Tensor, keys: Tensor, v: Tensor, top: Tensor, eps: float,
                key_delta: Optional[Tensor] = None):
        k = keys.shape[1]
        kept, delta = top[:, :k], top[:, k]
        weights = threshold_weights(kept, delta, eps)  # (B, k)
        ctx.save_for_backward(query, keys, v, kept, delta, weights, key_delta)
        ctx.eps = eps
        return weights

    @staticmethod
    def backward(ctx, grad: Tensor):
        query, keys, v, kept, delta, weights, key_delta = ctx.saved_tensors
        g_scores = threshold_weights_grad(grad, kept, delta, weights, ctx.eps)  # (B, k)
        if key_delta is None:  # δ constant (SPEC §2.4)
            g_query, g_keys, g_v = mlp_scores_grad(query, keys, v, g_scores)
            return g_query, g_keys, g_v, None, None, None
        # δ's gradient too: the (k+1)-th memory's score is one more MLP score
        g_all = torch.cat([g_scores, threshold_delta_grad(g_scores)], 1)  # (B, k+1)
        g_query, g_keys, g_v = mlp_scores_grad(query, torch.cat([keys, key_delta], 1), v, g_all)
        k = keys.shape[1]
        return g_query, g_keys[:, :k], g_v, None, None, g_keys[:, k:]


class Selection(NamedTuple):
    """What the ranking of one step chose: replayed when the sparse engine recomputes a block."""
    top: Tensor  # (B, k+1)  the k_top best scores and δ, sorted
    slots: Tensor  # (B, k+1)  slots of the k_top best memories and of δ's memory


class Attention(NamedTuple):
    summary: Tensor  # (B, H)  s(t)
    weights: Tensor  # (B, m)  weights of the read memories
    slots: Tensor  # (B, m)  their slots in the bank
    selection: Optional[Selection]  # None when every memory was read (n <= k_top, dense)


def rank_memories(scorer, query: Tensor, bank: MemoryBank, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best memories of ``bank`` for ``query`` (B, d_k), without graph: their scores
    (B, k) and slots (B, k).  On the CPU a scorer with ``rank_keys`` (the MLP's) ranks from
    what the bank caches beside the keys (``MemoryBank.ranking_keys``)."""
    start, stop = bank.window()
    keys = bank.keys[:, start:stop]  # (B, n, d_k)
    cache_fn = getattr(scorer, "rank_keys", None)
    if cache_fn is None or query.device.type != "cpu":
        top, index = scorer.rank(query, keys, k)
    else:
        top, index = scorer.rank(query, keys, k, bank.ranking_keys(cache_fn)[:, start:stop])
    return top, index.add_(start)


def attend(scorer, h_hat: Tensor, bank: MemoryBank, k_top: int, dense: bool = False,
           selection: Optional[Selection] = None, eps: float = 0.0,
           block_score_grad: bool = False, delta_grad: bool = False) -> Attention:
    """Summary ``s(t) = Σ_i w_i m_i`` over the memory (SPEC §2.3–2.5).

    Sparse (``dense=False``) with ``n > k_top``: every memory is scored without a graph (the scores
    of the unselected memories get no credit anyway: they fall below the stop-gradient threshold
    δ), the ``k_top`` best are gathered from the bank and re-scored with a graph, so the forward
    and backward cost of the summary is O(B·k_top·H) and credit flows to those memories alone.
    ``n ≤ k_top`` or ``dense=True`` (the self-attention baseline): softmax over all ``n``.
    ``selection``: the ranking this step made before (the sparse engine's recomputation replays
    it instead of scoring every memory again).  ``block_score_grad``: the query reads ĥ detached
    (the bank's keys were then written from detached memories), so the scores send gradient to
    the scorer's parameters only.  ``delta_grad`` (with ``block_score_grad``): the threshold δ
    passes its gradient on to the scorer's parameters through the (k_top+1)-th memory's score,
    its key recomputed from the stored memory (no credit reaches that memory).
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
                selection = Selection(*rank_memories(scorer, query, bank, k_top + 1))
        top, slots = selection[0], selection[1][:, :k_top]  # (B, k+1), (B, k)
        values, keys = bank.gather(slots)  # (B, k, H), (B, k, d_k)
        key_delta = None
        if delta_grad and torch.is_grad_enabled():  # δ's memory: its key, graph to W_k only
            key_delta = scorer.keys(bank.stored_values(selection[1][:, k_top:]))  # (B, 1, d_k)
        if type(scorer) is MLPScorer and torch.is_grad_enabled():
            # the same maths as below in one autograd node (see _MLPSparseWeights)
            weights = _MLPSparseWeights.apply(query, keys, scorer.v, top, eps, key_delta)
        else:
            # re-score the kept memories (and δ's, with delta_grad) with a graph
            scored = keys if key_delta is None else torch.cat([keys, key_delta], 1)
            scores = scorer.scores(query, scored)  # (B, k) or (B, k+1)
            # Forward values exactly those that were ranked; gradient of the re-scored ones.
            scores = scores - scores.detach() + top[:, :scores.shape[1]]
            delta = top[:, k_top] if key_delta is None else scores[:, k_top]
            weights = threshold_weights(scores[:, :k_top], delta, eps,
                                        delta_grad=key_delta is not None)  # (B, k)
    summary = (weights.unsqueeze(1) @ values).squeeze(1)  # (B, 1, m) @ (B, m, H) -> (B, H)
    return Attention(summary, weights, slots, selection)
