"""Attention scorers: the raw score ``a_i`` of memory ``m_i`` given the provisional state ĥ(t).

Every scorer splits into a *key* that depends on the memory alone (computed once, when the memory
is written, and cached in the bank — SPEC §2.3), a *query* that depends on ĥ(t) alone, and a
``scores(query, keys)`` that combines them:

* ``MLPScorer`` (default, SPEC §2.3): the one-hidden-layer MLP on ``[ĥ; m_i]``,
  ``a_i = v · tanh(W_q ĥ + W_k m_i + b)``; key ``W_k m_i`` (d_att), query ``W_q ĥ + b`` (d_att).
* ``DotScorer`` (an option, SPEC §9): ``a_i = (W_q ĥ)·(W_k m_i) / √d_att`` — query-dependent like
  the MLP but scored by one batched matrix product instead of ``n·d_att`` tanh evaluations.
* ``ReleaseScorer`` (SPEC §8.2, for comparison only): the authors' single linear unit on
  ``tanh([ĥ; m_i])``, ``a_i = u·tanh(ĥ) + w·tanh(m_i) + b``.  The ĥ term is the same for every
  memory, so it cancels in the threshold: the selection ignores the current state.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import native

__all__ = ["MLPScorer", "DotScorer", "ReleaseScorer", "make_scorer", "SCORERS"]


# elements (b·n·d_att) of one tile of the ranking: 2**19 float32 = 2 MiB, which stays in this
# CPU's L2 cache through the three passes (the whole (B, n, d_att) tensor at long T does not:
# tens of MB each pass); measured for the rational form at n = 50 / 250 / 500, B=64, d_att=128:
# 0.24 / 1.20 / 2.22 ms against 0.28 / 1.24 / 2.47 with 2**18 and 0.25 / 1.18 / 4.45 untiled
RANK_TILE = 2 ** 19


@functools.lru_cache(maxsize=None)
def rational_limit(dtype: torch.dtype) -> float:
    """The largest |q|, |k| the rational ranking takes in ``dtype``: every factor e^{±2q},
    e^{±2k} stays a normal number (their product may still overflow or underflow: that gives σ
    = 0 or 1, correctly; a factor that overflowed or lost its digits would not).  float32 39.3,
    float64 319, float16 4.4."""
    info = torch.finfo(dtype)
    return 0.45 * min(math.log(info.max), -math.log(info.tiny))


class MLPScorer(nn.Module):
    """``a_i = v · tanh(W_q ĥ + W_k m_i + b)``, hidden width ``att_hidden`` (SPEC §2.3)."""

    def __init__(self, hidden_size: int, att_hidden: int):
        super().__init__()
        self.query_proj = nn.Linear(hidden_size, att_hidden, bias=True)  # W_q, b
        self.key_proj = nn.Linear(hidden_size, att_hidden, bias=False)  # W_k
        self.v = nn.Parameter(torch.empty(att_hidden))
        bound = 1.0 / math.sqrt(att_hidden)
        nn.init.uniform_(self.v, -bound, bound)
        self.key_size = att_hidden
        self.fused = False
        self._buffer = None  # scratch for the ranking (not state: never saved)

    def _scratch(self, like: Tensor) -> Tensor:
        """A (B, n, d_att) tensor for the ranking, carved from a buffer kept between steps
        (allocating 2·10⁶ floats anew at every step costs as much as the arithmetic)."""
        n = like.numel()
        buf = self._buffer
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffer = like.new_empty(max(n, 2 * (0 if buf is None else buf.numel())))
        return buf[:n].view(like.shape)

    def keys(self, m: Tensor) -> Tensor:
        return self.key_proj(m)  # (B, H) -> (B, d_att)

    def query(self, h_hat: Tensor) -> Tensor:
        return self.query_proj(h_hat)  # (B, H) -> (B, d_att)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        # v·tanh(z) written as 2·v·sigmoid(2z) − Σv (the same function, see ``rank``)
        hidden = torch.sigmoid(2 * (query.unsqueeze(1) + keys))  # (B, n, d_att)
        return 2 * (hidden @ self.v) - self.v.sum()  # (B, n)

    def rank_keys(self, keys: Tensor) -> Tensor:
        """What the bank caches beside each key for :meth:`rank`: ``e^{−2k}`` (same shape), NaN
        where ``|k|`` exceeds :func:`rational_limit` (there a factor could overflow: the
        ranking then scores by the sigmoid form)."""
        limit = rational_limit(keys.dtype)
        return torch.exp(-2 * keys).masked_fill_(keys.abs() > limit, float("nan"))

    def rank(self, query: Tensor, keys: Tensor, k: int,
             cache: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The ``k`` best scores and their positions, without graph: (B, k), (B, k).

        The dominant cost of SAB at long T: ``B·n·d_att`` tanh per step (SPEC §9).  Written as
        ``v·tanh(q + k) = 2·v·σ(2q + 2k) − Σv`` (the same function; PyTorch's CPU sigmoid is
        several times faster than its tanh).  With ``cache`` (:meth:`rank_keys` of the keys,
        kept by the bank: ``sab.memory.MemoryBank.ranking_keys``) the sigmoid needs no
        exponential per memory: ``σ(2q + 2k) = 1 / (1 + e^{−2q}·e^{−2k})``, one multiply-add
        and one division per element (no cancellation: both factors are positive), done by
        ``sab.native``'s kernel in one pass over the cache (3.1–3.7× faster than the three ATen
        passes it replaces, which run where it is not built).  A query or key beyond
        :func:`rational_limit` (NaN in the rational scores) falls back to the sigmoid.
        With ``fused`` set (``SABLSTM(..., fused_scorer=True)``) a kernel compiled by
        ``torch.compile`` does the arithmetic and the dot product in one pass over the keys (it
        compiles once per process, for a few seconds; no faster than ``sab.native``'s).
        """
        scores = None
        if cache is not None:
            limit = rational_limit(query.dtype)
            a = torch.exp(-2 * query).masked_fill_(query.abs() > limit, float("nan"))
            scores = self._rational(a, cache)  # (B, n): Σ_j v_j σ_j
            if bool(scores.isnan().any()):  # out of the rational form's range (or NaN input)
                scores = None
        if scores is None:
            scores = self._sigmoid(query, keys)
        # 2·x − Σv is increasing in x: rank first, then transform the k best only
        top, index = scores.topk(k, dim=-1)
        return top.mul_(2).sub_(self.v.sum()), index  # (B, k)

    def _tiled(self, like: Tensor, fill) -> Tensor:
        """``hidden @ v`` (B, n) for the (B, n, d_att) ``hidden`` that ``fill(out, rows)`` writes
        into ``out`` for the batch rows ``rows`` (a slice; ``None``: all), in tiles of
        ``RANK_TILE`` elements that stay in cache across its passes (on a GPU one launch for the
        whole batch is cheaper); a scratch buffer kept between steps holds each tile."""
        B, n, d = like.shape
        rows = max(1, RANK_TILE // max(1, n * d)) if like.device.type == "cpu" else B
        if rows >= B:  # one tile: no slicing (a dozen operations less)
            hidden = self._scratch(like)
            fill(hidden, None)
            return torch.mv(hidden.view(-1, d), self.v).view(B, n)
        scores = like.new_empty(B, n)
        for s in range(0, B, rows):
            tile = slice(s, s + rows)
            hidden = self._scratch(like[tile])  # (b, n, d_att)
            fill(hidden, tile)
            torch.mv(hidden.view(-1, d), self.v, out=scores[tile].view(-1))
        return scores

    def _sigmoid(self, query: Tensor, keys: Tensor) -> Tensor:
        """``Σ_j v_j σ(2q_j + 2k_ij)`` (B, n)."""
        if self.fused:
            return _compiled(_mlp_scores)(query, keys, self.v)
        q2 = 2 * query  # 2(q + k) = 2q + 2k exactly: one pass over the keys less

        def fill(out, rows):
            torch.add(_tile(q2, rows).unsqueeze(1), _tile(keys, rows), alpha=2, out=out).sigmoid_()
        return self._tiled(keys, fill)

    def _rational(self, a: Tensor, cache: Tensor) -> Tensor:
        """``Σ_j v_j / (1 + a_j·c_ij)`` (B, n) with ``a = e^{−2q}`` (B, d), ``c = e^{−2k}``."""
        if self.fused:
            return _compiled(_mlp_scores_rational)(a, cache, self.v)
        kernel = _ranking_kernel(cache)
        if kernel is not None:  # one pass over the cache (sab.native)
            return kernel.rational_scores(a, cache, self.v)
        one = cache.new_ones(())

        def fill(out, rows):
            torch.addcmul(one, _tile(a, rows).unsqueeze(1), _tile(cache, rows),
                          out=out).reciprocal_()
        return self._tiled(cache, fill)


def _ranking_kernel(cache: Tensor):
    """``sab.native``'s module where its ranking kernel applies (CPU, float32/float64)."""
    if cache.device.type != "cpu" or cache.dtype not in (torch.float32, torch.float64):
        return None
    return native.kernels("ranking")


def _tile(x: Tensor, rows: Optional[slice]) -> Tensor:
    return x if rows is None else x[rows]  # (no slicing operation for the whole batch)


def mlp_scores_grad(query: Tensor, keys: Tensor, v: Tensor, grad: Tensor):
    """The backward of ``a = v·tanh(query + keys)`` written out: from ``∂L/∂a`` (B, k) to the
    gradients of ``query`` (B, d), ``keys`` (B, k, d) and ``v`` (d,).

    With ``σ = sigmoid(2(query + keys))``: ``tanh = 2σ − 1`` and ``1 − tanh² = 4σ(1 − σ)``, so the
    tanh is never formed (PyTorch's CPU tanh is slow, ``sab.fastmath``) and the (B, k, d) tensors
    are passed over six times instead of eleven."""
    B, k, d = keys.shape
    sig = torch.add(2 * query.unsqueeze(1), keys, alpha=2).sigmoid_()  # (B, k, d)
    # ∂L/∂v = Σ grad·tanh = 2·σᵀgrad − Σgrad, one addmv
    g_v = torch.addmv(grad.sum(), sig.view(B * k, d).t(), grad.reshape(B * k), beta=-1, alpha=2)
    g_z = torch.addcmul(sig, sig, sig, value=-1).mul_(grad.unsqueeze(-1) * (4 * v))  # σ(1 − σ)·…
    return g_z.sum(1), g_z, g_v


class DotScorer(nn.Module):
    """``a_i = (W_q ĥ + b)·(W_k m_i) / √d_att``: a cheaper query-dependent scorer (an option)."""

    def __init__(self, hidden_size: int, att_hidden: int):
        super().__init__()
        self.query_proj = nn.Linear(hidden_size, att_hidden, bias=True)
        self.key_proj = nn.Linear(hidden_size, att_hidden, bias=False)
        self.scale = 1.0 / math.sqrt(att_hidden)
        self.key_size = att_hidden

    def keys(self, m: Tensor) -> Tensor:
        return self.key_proj(m)  # (B, H) -> (B, d_att)

    def query(self, h_hat: Tensor) -> Tensor:
        return self.query_proj(h_hat) * self.scale  # (B, H) -> (B, d_att)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        return (keys @ query.unsqueeze(-1)).squeeze(-1)  # (B, n, d) @ (B, d, 1) -> (B, n)

    def rank(self, query: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.scores(query, keys).topk(k, dim=-1)


class ReleaseScorer(nn.Module):
    """The release's ``u·tanh(ĥ) + w·tanh(m_i) + b`` (SPEC §8.2). For comparison only."""

    def __init__(self, hidden_size: int, att_hidden: int | None = None):
        super().__init__()
        self.linear = nn.Linear(2 * hidden_size, 1)  # one unit on tanh([ĥ; m])
        self.hidden_size = hidden_size
        self.key_size = 1

    def keys(self, m: Tensor) -> Tensor:
        w_m = self.linear.weight[:, self.hidden_size:]  # (1, H)
        return torch.tanh(m) @ w_m.t()  # (B, 1)

    def query(self, h_hat: Tensor) -> Tensor:
        w_h = self.linear.weight[:, : self.hidden_size]  # (1, H)
        return torch.tanh(h_hat) @ w_h.t() + self.linear.bias  # (B, 1)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        return query + keys.squeeze(-1)  # (B, 1) + (B, n) -> (B, n)

    def rank(self, query: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.scores(query, keys).topk(k, dim=-1)


SCORERS = {"mlp": MLPScorer, "dot": DotScorer, "release": ReleaseScorer}

_COMPILED: dict = {}


def _mlp_scores(query: Tensor, keys: Tensor, v: Tensor) -> Tensor:
    # v·sigmoid(2(q + k)), one pass over the keys; the caller maps x to 2x − Σv = v·tanh(q + k)
    return (torch.sigmoid(2 * query.unsqueeze(1) + 2 * keys) * v).sum(-1)  # (B, n)


def _mlp_scores_rational(a: Tensor, cache: Tensor, v: Tensor) -> Tensor:
    # the same with σ(2q + 2k) = 1 / (1 + e^{−2q}·e^{−2k}): ``a`` = e^{−2q}, ``cache`` = e^{−2k}
    return (v / (1 + a.unsqueeze(1) * cache)).sum(-1)  # (B, n)


def _compiled(fn):
    """``fn`` compiled once per process (dynamic shapes: n grows every k_att steps)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def make_scorer(name: str, hidden_size: int, att_hidden: int) -> nn.Module:
    if name not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {name!r}")
    return SCORERS[name](hidden_size, att_hidden)
