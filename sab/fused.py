"""The reference engine's fast path: one SAB layer over a chunk as a single autograd node.

The generic loop (``SABLSTM._run_layer``) builds about a dozen autograd nodes per time step —
the recurrent product, the LSTM pointwise step, the query, the gather, the weights, the summary,
the write — and at T=100 their bookkeeping (node creation, the engine's scheduling, Python
``autograd.Function`` calls, a fresh buffer for every intermediate) costs as much as their
arithmetic.  ``fused_layer`` computes the same forward with no graph, writing each step's
results into buffers allocated once per chunk, and hand-writes the backward as one reverse sweep
over time, with the weight gradients of all steps (``W_hh``, ``W_q``, ``W_k``) computed at the
end as one matrix product each.

It computes what the generic path computes (tests hold the two to float64 1e-10,
``tests/test_fused.py``) for the MLP scorer, sparse attention (softmax while ``n ≤ k_top``) or
dense attention (the self-attention baseline), the scores' credit going into ĥ and the memories
(SPEC §3) or to the scorer alone (``block_score_grad``, with or without ``delta_grad``), any
``k_trunc``, ``k_top``, ``k_att``, ``att_eps``, ``max_memories``, a carried state and a carried
memory with or without graph, and attention records.  ``SABLSTM`` takes it whenever autograd is
on: the reference engine's chunks and the sparse engine's recomputations of a block (which
replay the rankings its forward logged).  Without autograd — evaluation and the sparse engine's
graph-free forward, which logs — :func:`fused_forward` runs the same steps keeping no per-step
activations (``SABLSTM._fused_applies``, ``SABLSTM._fused_forward_applies``).

Credit routing follows the memory bank (``sab.memory``): a memory written in this chunk collects
the credit of its reads in a chunk-local buffer and receives it at its write step (multi-hop
credit, SPEC §3); memories carried in with a graph get theirs through the bank's graph, and the
node returns a token so that later chunks reading this chunk's memories run their backward first.
When the chunk comes with a carried graph, that graph has rows for this chunk's memories too
(the sparse engine's gradient store covers every memory of its chunk), and all credit goes
there.

Each step's tensor work — the LSTM step and its backward, a read (sparse or dense) and its
backward — runs as one call into ``sab.native``'s C++ where that is built (the LSTM step
bit-identical to the Python below, the reads loops of their own equal to it to rounding,
``tests/test_native.py``), and as the Python below otherwise.  The loop, the bank's bookkeeping
and the routing of credit to carried memories stay here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from . import native
from .cell import Selection, cell_update, gate_activations_, pointwise_backward, rank_memories
from .memory import MemoryBank, _flat_rows, _Graph
from .scorer import RANK_TILE, MLPScorer, mlp_scores_grad, rational_limit
from .sparsifier import threshold_delta_grad, threshold_forward, threshold_grad
from .state import AttentionRecord

__all__ = ["fused_layer", "fused_forward"]


@dataclass
class _Config:
    bank: MemoryBank
    scorer: MLPScorer
    step0: int
    k_trunc: Optional[int]
    k_top: int
    k_att: int
    eps: float
    delta_grad: bool
    block_score_grad: bool
    dense: bool
    record: bool
    replay: Optional[Iterator] = None  # the sparse engine's logged rankings, one per read
    log: Optional[object] = None  # the sparse engine's ForwardLog, filled by its forward
    reads: Optional[list] = None  # with ``record``: what each step read, for the record
    # the C++ step functions (``sab.native``; None: the Python steps), set by ``_forward``
    native: Optional[object] = None


class _Read:
    """What one attending step read, for its backward (and the attention record)."""
    __slots__ = ("t", "dense", "query", "ids", "weights", "shifted", "denom", "values", "keys",
                 "m_delta", "delta_ids", "mem_steps", "a")

    def __init__(self, t, dense, query, ids, weights, shifted, denom, values, keys, m_delta,
                 delta_ids, mem_steps, a=None):
        self.t, self.dense, self.query, self.ids = t, dense, query, ids
        self.weights, self.shifted, self.denom = weights, shifted, denom  # (shifted, denom: sparse)
        self.values, self.keys, self.m_delta = values, keys, m_delta
        self.delta_ids, self.mem_steps = delta_ids, mem_steps
        # a dense read of the C++ function: e^{−2q} (B, d), and ``keys`` holds the memories'
        # cached e^{−2k} rows instead of their keys
        self.a = a


def fused_layer(xp: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, scorer: MLPScorer,
                bank: MemoryBank, step0: int, k_trunc: Optional[int], k_top: int, k_att: int,
                eps: float, delta_grad: bool, block_score_grad: bool, dense: bool,
                record: bool, replay: Optional[Iterator] = None
                ) -> tuple[Tensor, Tensor, Optional[AttentionRecord]]:
    """One SAB layer over a chunk: ``xp`` (T, B, 4H) = x W_ihᵀ + b per step, the state entering
    it (B, H) each, the layer's ``bank`` (written in place, its graph and token updated) →
    outputs h(t) (T, B, H), the last cell state (B, H) and, with ``record``, the
    :class:`AttentionRecord` (its summaries s(t) carry gradient, as the generic loop's).
    ``replay``: the rankings the sparse engine logged in its forward, one per attending step,
    used instead of ranking again (the engine's recomputation of a block)."""
    cfg = _Config(bank, scorer, step0, k_trunc, k_top, k_att, eps, delta_grad, block_score_grad,
                  dense, record, replay)
    first = bank.next_id
    carried = bank.token if bank.requires_grad else None
    out, summary, c, token = _FusedLayer.apply(
        xp, h0, c0, w_hh, scorer.query_proj.weight, scorer.query_proj.bias,
        scorer.key_proj.weight, scorer.v, carried, cfg)
    if bank.next_id > first:  # this chunk wrote memories: later reads route credit to them
        bank.token = token  # (the graph was set up by the forward)
    rec = _record(cfg.reads, summary, step0, k_top) if record else None
    return out, c, rec


def _record(reads: List[_Read], summary: Tensor, step0: int, k_top: int) -> AttentionRecord:
    T, B, _ = summary.shape
    width = max([k_top] + [r.ids.shape[1] for r in reads])
    weights = summary.new_zeros(T, B, width)
    ids = torch.full((T, B, width), -1, dtype=torch.long, device=summary.device)
    steps = ids.clone()
    by_width: Dict[int, List[_Read]] = {}  # reads of the same width go in with one copy each
    for r in reads:
        by_width.setdefault(r.ids.shape[1], []).append(r)
    for m, group in by_width.items():
        ts = torch.tensor([r.t for r in group], device=summary.device)
        for buf, rows in ((weights, [r.weights for r in group]), (ids, [r.ids for r in group]),
                          (steps, [r.mem_steps for r in group])):
            buf[:, :, :m].index_copy_(0, ts, torch.stack(rows))  # (reads, B, m) at their steps
    return AttentionRecord(summary, weights, ids, steps,
                           torch.arange(step0, step0 + T, device=summary.device))


def _is_cut(step: int, k_trunc: Optional[int]) -> bool:
    return k_trunc is not None and step % k_trunc == 0


class _Pass(NamedTuple):
    """What :func:`_forward` computed over a chunk (``None``/empty where it was not kept)."""
    acts: List[Tensor]  # gate activations (B, 4H) per step (saved)
    cs: Optional[Tensor]  # (T+1, B, H) c entering each step, and the last (saved)
    tcs: Optional[Tensor]  # (T, B, H) tanh(c(t)) (saved)
    h_hats: List[Tensor]  # ĥ(t) (B, H) per step (saved)
    outs: List[Tensor]  # h(t) (B, H) per step (saved or keep_outputs)
    summary: Optional[Tensor]  # (T, B, H) s(t) (saved or record)
    reads: List["_Read"]  # what each attending step read (saved or record)
    writes: Dict[int, int]  # step -> id of the memory written there
    h: Tensor  # the last h (B, H)
    c: Tensor  # the last c (B, H)


def _forward(cfg: _Config, xps, T: int, h0: Tensor, c0: Tensor, w_hh: Tensor, w_q: Tensor,
             b_q: Tensor, w_k: Tensor, save: bool, keep_outputs: bool = True) -> _Pass:
    """The forward of one layer over a chunk, without graph: ``xps`` the projected inputs
    x W_ihᵀ + b, (B, 4H) per step.  ``save``: keep what the hand-written backward needs (each
    step's activations, c and tanh c, ĥ) — the node's forward; else only the outputs (with
    ``keep_outputs``), the record's reads and the sparse engine's ``cfg.log`` (the state entering
    every block, the ranking of every step that attended) — evaluation and the sparse engine's
    graph-free forward, whose memory must not grow by per-step activations."""
    bank, log = cfg.bank, cfg.log
    cfg.native = K = _native(cfg.scorer, h0)
    w_hh_t = w_hh.t()
    h, c = h0, c0
    B, H = h0.shape
    acts: List[Tensor] = []  # gate activations (B, 4H) per step
    h_hats: List[Tensor] = []  # ĥ(t) (B, H) per step
    outs: List[Tensor] = []  # h(t) (B, H) per step
    cs = tcs = summary = None
    if save:  # one buffer per chunk: c entering each step (and the last), tanh(c(t))
        cs, tcs = h0.new_empty(T + 1, B, H), h0.new_empty(T, B, H)
        cs[0] = c0
    if save or cfg.record:
        summary = h0.new_zeros(T, B, H)  # s(t), zero before the first memory
    reads: List[_Read] = []
    writes = {}  # t -> id of the memory written at step t
    for t, xp_t in enumerate(xps):
        g = cfg.step0 + t
        if log is not None and (t == 0 or _is_cut(g, cfg.k_trunc)):
            log.add_boundary(t, h, c, bank)
        # (no out= here: MKL's addmm into a given buffer rounds differently, and the
        # sparse engine's graph-free forward must equal its recomputations bit for bit)
        # ĥ and h are fresh tensors, not rows of a (T, B, H) buffer: MKL's products round
        # differently on unaligned rows, and both engines' forwards must agree bit for bit
        if K is not None:  # the same operations in C++
            act, h_hat, c, _ = (K.lstm_step(xp_t, h, w_hh_t, cs[t], cs[t + 1], tcs[t]) if save
                                else K.lstm_step(xp_t, h, w_hh_t, c, None, None))
        else:
            act = gate_activations_(torch.addmm(xp_t, h, w_hh_t))  # (B, 4H)
            h_hat, c, _ = (cell_update(act, cs[t], cs[t + 1], tcs[t]) if save  # c: a row of cs
                           else cell_update(act, c))
        if save:
            acts.append(act)
            h_hats.append(h_hat)
        if bank.count > 0:
            s = h0.new_empty(B, H) if summary is None else summary[t]
            r = _attend(cfg, t, h_hat, w_q, b_q, s)
            if save or cfg.record:
                reads.append(r)
            h = h_hat + s
        else:
            h = h_hat
        if save or keep_outputs:
            outs.append(h)
        if (g + 1) % cfg.k_att == 0:
            writes[t] = bank.write(h, F.linear(h, w_k), g)  # no graph here: values only
    return _Pass(acts, cs, tcs, h_hats, outs, summary, reads, writes, h, c)


def fused_forward(xps, T: int, h0: Tensor, c0: Tensor, w_hh: Tensor, scorer: MLPScorer,
                  bank: MemoryBank, step0: int, k_trunc: Optional[int], k_top: int, k_att: int,
                  eps: float, delta_grad: bool, block_score_grad: bool, dense: bool,
                  record: bool, log=None, keep_outputs: bool = True):
    """One SAB layer over a chunk without autograd (evaluation, the sparse engine's graph-free
    forward): the same forward as :func:`fused_layer`, keeping no per-step activations.
    ``xps`` the projected inputs (B, 4H) per step, ``log`` the sparse engine's ``ForwardLog`` →
    outputs (T, B, H) (``None`` without ``keep_outputs``), the last h and c (B, H) and, with
    ``record``, the :class:`AttentionRecord`."""
    cfg = _Config(bank, scorer, step0, k_trunc, k_top, k_att, eps, delta_grad, block_score_grad,
                  dense, record, log=log)
    with torch.no_grad():
        p = _forward(cfg, xps, T, h0, c0, w_hh, scorer.query_proj.weight,
                     scorer.query_proj.bias, scorer.key_proj.weight, False, keep_outputs)
        out = torch.stack(p.outs) if keep_outputs else None  # (T, B, H)
        rec = _record(p.reads, p.summary, step0, k_top) if record else None
    return out, p.h, p.c, rec


class _FusedLayer(Function):
    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, w_q, b_q, w_k, v, carried_token, cfg: _Config):
        T = xp.shape[0]
        bank = cfg.bank
        first = bank.next_id
        p = _forward(cfg, xp.unbind(0), T, h0, c0, w_hh, w_q, b_q, w_k, True)
        ctx.cfg, ctx.reads, ctx.writes, ctx.first = cfg, p.reads, p.writes, first
        ctx.carried = carried_token is not None
        ctx.graph = bank.graph if ctx.carried else None  # the carried memories' graph
        ctx.n_local = bank.next_id - first
        if ctx.n_local:  # later chunks' reads of these memories will add to the bank's graph
            if bank.graph is None:
                bank.graph = _Graph(first_id=first)
            bank.graph.n_ids = max(bank.graph.n_ids, bank.next_id - bank.graph.first_id)
        ctx.later = bank.graph if ctx.n_local else None
        # no reference to the bank from here on: the bank will hold this node's token, and a
        # cycle through an autograd node is never collected (it leaked every step's buffers)
        cfg.bank = None
        out, h_hats = torch.stack(p.outs), torch.stack(p.h_hats)  # (T, B, H)
        ctx.save_for_backward(h0, w_hh, w_q, w_k, v, p.cs, p.tcs, h_hats, out)
        ctx.acts = p.acts
        if cfg.record:
            cfg.reads = p.reads
        return out, p.summary, p.c.clone(), xp.new_zeros(())  # c(T) (B, H), the token

    @staticmethod
    def backward(ctx, d_out, d_summary, d_c, _d_token):
        h0, w_hh, w_q, w_k, v, cs, tcs, h_hats, out = ctx.saved_tensors
        acts = ctx.acts
        cfg, first, n_local = ctx.cfg, ctx.first, ctx.n_local
        blocked = cfg.block_score_grad  # else the scores' credit reaches ĥ and the memories
        T, B, H = out.shape
        d = w_k.shape[0]
        dxp = d_out.new_empty(T, B, 4 * H)
        g_query = d_out.new_zeros(T, B, d)  # ∂L/∂query per step (for W_q and b)
        g_v = torch.zeros_like(v)
        key_rows: List[tuple] = []  # (∂L/∂key (B, m, d), memory (B, m, H)) for W_k's gradient
        # the credit this chunk's reads send to this chunk's memories, waiting for their write
        # step: through the values, and through the keys (to W_k; unblocked, to h(t) too)
        # (carried in with a graph, that graph holds this chunk's memories too: all credit goes
        # there, as in the sparse engine's recomputation of a block)
        own = n_local and not ctx.carried
        # one buffer, a row [value | key] per memory: a read's credit goes in with one index_add
        local = d_out.new_zeros(B, n_local, H + d) if own else None
        local_flat = None if local is None else local.view(B * n_local, H + d)  # (B·n, H+d)
        later = ctx.later  # later chunks' reads of these memories
        reads = {r.t: r for r in ctx.reads}
        K = cfg.native
        dh_next = torch.zeros_like(d_out[0])
        dc = d_c
        for t in range(T - 1, -1, -1):
            dh = d_out[t] + dh_next
            mem_id = ctx.writes.get(t)
            if mem_id is not None:  # the credit its readers sent to memory h(t)
                gk = None
                if local is not None:
                    gk = local[:, mem_id - first, H:]  # (B, d)
                    dh += local[:, mem_id - first, :H]
                gv2, gk2 = later.take(mem_id)
                if gv2 is not None:
                    dh += gv2
                    gk = gk2 if gk is None else gk + gk2
                if gk is not None:
                    key_rows.append((gk.unsqueeze(1), out[t].unsqueeze(1)))  # its key W_k h(t)
                    if not blocked:
                        dh.addmm_(gk, w_k)
            r = reads.get(t)
            dh_hat = dh  # h(t) = ĥ(t) + s(t)
            if r is not None:  # ∂L/∂s(t): through h(t) and directly (the head reads s(t))
                ds = dh + d_summary[t]
                if r.a is not None:
                    _read_backward_dense_native(ctx, K, r, ds, v, g_query[t], g_v, local_flat)
                elif K is not None and not r.dense:
                    _read_backward_native(ctx, K, r, ds, w_k, v, g_query[t], g_v, key_rows,
                                          local_flat)
                else:
                    g_v += _read_backward(ctx, r, ds, w_k, v, g_query[t], key_rows, local_flat)
                if not blocked:  # the query W_q ĥ(t) + b
                    dh_hat = torch.addmm(dh, g_query[t], w_q)
            cut = _is_cut(cfg.step0 + t, cfg.k_trunc)  # h, c entered this step detached
            if K is not None:  # the same operations in C++
                dh_next, dc = K.lstm_step_backward(dh_hat, dc, acts[t], cs[t], tcs[t], dxp[t],
                                                   w_hh, cut)
                continue
            dgates, dc_prev = pointwise_backward(dh_hat, dc, acts[t], cs[t], tcs[t], dxp[t])
            if cut:
                dh_next, dc = torch.zeros_like(dh), torch.zeros_like(dc)
            else:
                dh_next, dc = dgates @ w_hh, dc_prev  # (B, 4H) @ (4H, H)
        first_cut = _is_cut(cfg.step0, cfg.k_trunc)
        # the weight gradients of every step at once
        h_prev = torch.cat([h0.unsqueeze(0), out[:-1]])  # h entering each step (T, B, H)
        g_w_hh = dxp.view(T * B, -1).t() @ h_prev.view(T * B, H)  # (4H, H)
        g_w_q = g_query.view(T * B, d).t() @ h_hats.view(T * B, H)  # (d, H)
        g_b_q = g_query.sum((0, 1))
        if key_rows:
            gk = torch.cat([k.reshape(-1, d) for k, _ in key_rows])  # (rows, d)
            mem = torch.cat([m.reshape(-1, H) for _, m in key_rows])  # (rows, H)
            g_w_k = gk.t() @ mem  # (d, H)
        else:
            g_w_k = torch.zeros_like(w_k)
        carried_grad = d_out.new_zeros(()) if ctx.carried else None
        return (dxp, None if first_cut else dh_next, None if first_cut else dc, g_w_hh, g_w_q,
                g_b_q, g_w_k, g_v, carried_grad, None)


def _attend(cfg: _Config, t: int, h_hat: Tensor, w_q: Tensor, b_q: Tensor,
            s: Tensor) -> _Read:
    """The forward of one step's attention, as ``sab.cell.attend`` computes it: the summary into
    ``s`` (B, H); the ranking into the sparse engine's ``cfg.log``; returns what the backward
    needs."""
    bank, scorer, k_top, log = cfg.bank, cfg.scorer, cfg.k_top, cfg.log
    B = h_hat.shape[0]
    start, stop = bank.window()
    top = m_delta = delta_ids = shifted = denom = None
    logged = None if cfg.replay is None else next(cfg.replay)  # consumed by every read
    dense = cfg.dense or stop - start <= k_top
    if cfg.native is not None:
        if not dense:
            return _attend_native(cfg, t, h_hat, w_q, b_q, s, logged)
        r = _attend_dense_native(cfg, t, h_hat, w_q, b_q, s)
        if r is not None:  # (None: beyond the rational form's range, read as below)
            return r
    query = F.linear(h_hat, w_q, b_q)  # (B, d), as the scorer's nn.Linear
    if dense:  # every memory, softmax (SPEC §2.4)
        slots = torch.arange(start, stop, device=h_hat.device).expand(B, -1)  # (B, n)
        values, keys = bank.gather(slots)  # (B, n, H), (B, n, d) copies (no graph here)
        weights = torch.softmax(scorer.scores(query, keys), dim=-1)  # (B, n)
        ids = bank.slot_ids[slots]  # (B, n)
        if log is not None:
            log.add_selection(None)  # every memory read: nothing to replay
    else:
        if logged is None:
            top, ranked = rank_memories(scorer, query, bank, k_top + 1)  # (B, k+1) each
        else:  # the ranking of the engine's forward: scores (B, k+1), slots (B, k+1)
            top, ranked = logged[0], logged[1]
        if log is not None:
            log.add_selection(Selection(top, ranked))
        # with δ's gradient, δ's memory too (its key is recomputed from its value)
        slots = ranked if cfg.delta_grad else ranked[:, :k_top]
        values, keys = bank.gather(slots)  # (B, k(+1), H), (B, k(+1), d) copies
        ids = bank.slot_ids[slots]  # (B, k(+1))
        if cfg.delta_grad:
            m_delta, delta_ids = values[:, k_top:], ids[:, k_top:]  # (B, 1, H), (B, 1)
            values, keys, ids = values[:, :k_top], keys[:, :k_top], ids[:, :k_top]
            slots = ranked[:, :k_top]
        # the weights (B, k), and ã = relu(top − δ) and Σã + ε for their backward
        weights, shifted, denom = threshold_forward(top[:, :k_top], top[:, k_top], cfg.eps)
    s.copy_(torch.bmm(weights.unsqueeze(1), values).squeeze(1))  # s(t) = Σ w_i m_i (B, H)
    return _Read(t, top is None, query, ids, weights, shifted, denom, values, keys, m_delta,
                 delta_ids, bank.slot_steps[slots] if cfg.record else None)


def _native(scorer, like: Tensor):
    """The C++ step functions where they compute what the Python steps do: on the CPU, in
    float32 or float64, with the MLP scorer not ranking by ``torch.compile``'s kernel; else
    ``None``."""
    if like.device.type != "cpu" or type(scorer) is not MLPScorer or scorer.fused \
            or like.dtype not in (torch.float32, torch.float64):
        return None
    # (their ranking is the ranking kernel's: without it, the Python steps rank as the scorer)
    return native.kernels() if native.kernels("ranking") is not None else None


def _attend_native(cfg: _Config, t: int, h_hat: Tensor, w_q: Tensor, b_q: Tensor, s: Tensor,
                   logged) -> _Read:
    """:func:`_attend`'s sparse read (n > k_top) through the C++ step function."""
    bank, scorer, k_top = cfg.bank, cfg.scorer, cfg.k_top
    start, stop = bank.window()
    cache = bank.ranking_keys(scorer.rank_keys) if logged is None else None
    replay = (None, None) if logged is None else (logged[0], logged[1])
    (query, top, ranked, values, keys, ids, weights, shifted, denom, m_delta,
     delta_ids) = cfg.native.attend_sparse(
        h_hat, w_q, b_q, scorer.v, bank.values, bank.keys, bank.slot_ids, cache, start, stop,
        k_top, cfg.eps, cfg.delta_grad, rational_limit(h_hat.dtype), RANK_TILE, *replay, s)
    if cfg.log is not None:
        cfg.log.add_selection(Selection(top, ranked))
    steps = bank.slot_steps[ranked[:, :k_top]] if cfg.record else None
    return _Read(t, False, query, ids, weights, shifted, denom, values, keys, m_delta, delta_ids,
                 steps)


def _attend_dense_native(cfg: _Config, t: int, h_hat: Tensor, w_q: Tensor, b_q: Tensor,
                         s: Tensor) -> Optional[_Read]:
    """:func:`_attend`'s dense read (softmax over every memory) through the C++ function, the
    scores in the ranking's rational form over the bank's cache; ``None`` where that form is out
    of range (the Python read then runs)."""
    bank = cfg.bank
    start, stop = bank.window()
    cache = bank.ranking_keys(cfg.scorer.rank_keys)
    # an append-only bank never rewrites a slot: the read keeps views of its buffers (a copy of
    # every memory at every step was O(T²) memory per chunk); a bounded ring bank is copied
    copy = bank.max_memories is not None and not bank.linear
    got = cfg.native.attend_dense(h_hat, w_q, b_q, cfg.scorer.v, bank.values, cache,
                                  bank.slot_ids, start, stop, rational_limit(h_hat.dtype), copy,
                                  s)
    if not got:
        return None
    query, a, values, cache_rows, ids, weights = got
    if cfg.log is not None:
        cfg.log.add_selection(None)  # every memory read: nothing to replay
    steps = bank.slot_steps[start:stop].clone().expand(ids.shape) if cfg.record else None
    return _Read(t, True, query, ids, weights, None, None, values, cache_rows, None, None, steps,
                 a)


def _read_backward_dense_native(ctx, K, r: _Read, ds: Tensor, v: Tensor, g_query: Tensor,
                                g_v: Tensor, local: Optional[Tensor]) -> None:
    """:func:`_read_backward` of a dense read of :func:`_attend_dense_native` through the C++
    function (which adds ``∂L/∂v`` into ``g_v`` and the credit of this chunk's memories into
    ``local``); the credit of memories carried in with a graph is routed here."""
    got = K.read_backward_dense(ds, r.values, r.keys, r.weights, r.a, v, g_query, g_v, r.ids,
                                local, ctx.first, ctx.n_local)
    if ctx.carried:  # (without ``local``: ∂L/∂values and ∂L/∂keys came back)
        ctx.graph.accumulate(r.ids, *got)


def _read_backward_native(ctx, K, r: _Read, ds: Tensor, w_k: Tensor, v: Tensor,
                          g_query: Tensor, g_v: Tensor, key_rows: list,
                          local: Optional[Tensor]) -> None:
    """:func:`_read_backward` of a sparse read through the C++ step function (which adds
    ``∂L/∂v`` into ``g_v`` and the credit of this chunk's memories into ``local``); the
    credit of memories carried in with a graph, and δ's key rows, are routed here."""
    g_values, g_keys, old = K.read_backward_sparse(
        ds, r.values, r.keys, r.weights, r.shifted, r.denom, r.query, v, w_k, r.m_delta, g_query,
        g_v, r.ids, r.delta_ids, local, ctx.first, ctx.n_local)
    m = r.ids.shape[1]
    if ctx.carried:
        ctx.graph.accumulate(r.ids, g_values, g_keys[:, :m])
    if r.m_delta is not None:  # as _delta_credit: to W_k through the stored value
        if local is None:
            key_rows.append((g_keys[:, m:], r.m_delta))
        elif old is not None:
            key_rows.append((g_keys[:, m:] * old, r.m_delta))


def _read_backward(ctx, r: _Read, ds: Tensor, w_k: Tensor, v: Tensor, g_query: Tensor,
                   key_rows: list, local: Optional[Tensor]) -> Tensor:
    """Backward of one step's attention ``s = Σ w_i m_i`` given ``∂L/∂s`` (B, H): credit to the
    read memories (``w_i ∂L/∂s`` and their keys' gradient), the query's gradient into
    ``g_query`` (B, d); returns ``∂L/∂v`` of this step."""
    # ∂L/∂w_i = m_i·ds; a product and a sum, not bmm: 64 one-row products cost 4× more here
    dw = (r.values * ds.unsqueeze(1)).sum(-1)  # (B, m)
    g_values = r.weights.unsqueeze(-1) * ds.unsqueeze(1)  # (B, m, H)
    keys = r.keys
    if r.dense:  # softmax
        g_scores = r.weights * (dw - (dw * r.weights).sum(-1, keepdim=True))
    else:
        g_scores = threshold_grad(dw, r.weights, r.shifted, r.denom)  # (B, k)
        if r.m_delta is not None:  # δ's memory's score: its key from the stored value
            g_scores = torch.cat([g_scores, threshold_delta_grad(g_scores)], 1)  # (B, k+1)
            # (a 2-D F.linear: ``(B, 1, H) @ w_kᵀ`` takes a 3× slower batched path)
            keys = torch.cat([keys, F.linear(r.m_delta.squeeze(1), w_k).unsqueeze(1)], 1)
    g_q, g_keys, g_v = mlp_scores_grad(r.query, keys, v, g_scores)
    g_query.copy_(g_q)
    m = r.ids.shape[1]
    _credit(ctx, r.ids, g_values, g_keys[:, :m], local)
    if r.m_delta is not None:  # δ's key reaches W_k only, never the memory
        _delta_credit(ctx, r, g_keys[:, m:], key_rows, local)
    return g_v


def _old(ctx, ids: Tensor) -> Optional[Tensor]:
    """(B, m, 1) where ``ids`` (B, m) are memories carried in from an earlier chunk; ``None``
    when there are none."""
    if ctx.first == 0:  # ids count from 0: nothing came before
        return None
    old = ids < ctx.first
    return old.unsqueeze(-1) if bool(old.any()) else None


def _local_rows(ctx, ids: Tensor, old: Optional[Tensor]) -> Tensor:
    """Rows of the (B·n_local, D) view of the chunk-local buffer for this chunk's memories
    ``ids`` (B, m) → (B·m,); carried memories (``old``) point at row 0 (their gradient is
    masked)."""
    rel = ids - ctx.first
    if old is not None:
        rel = rel.clamp_min(0)
    return _flat_rows(rel, ctx.n_local)


def _local_add(buf: Tensor, flat: Tensor, grad: Tensor, old: Optional[Tensor]) -> None:
    """Add ``grad`` (B, m, D) into the rows ``flat`` (``_local_rows``) of ``buf``
    (B·n_local, D), a view of the chunk-local buffer; entries of carried memories (``old``) are
    left out."""
    if old is not None:
        grad = grad.masked_fill(old, 0)
    buf.index_add_(0, flat, grad.reshape(-1, grad.shape[-1]))


def _credit(ctx, ids: Tensor, g_values: Tensor, g_keys: Tensor,
            local: Optional[Tensor]) -> None:
    """Route the credit of a read of memories ``ids`` (B, m) through their values (B, m, H) and
    keys (B, m, d): to this chunk's memories (it waits in ``local``, (B·n_local, H + d) rows
    [value | key], for their write step) and to memories carried in with a graph (their chunk's
    writes take it); memories carried in without a graph get none.  With a carried graph, this
    chunk's memories have their rows in it too: one accumulation for all, taken at their write
    steps."""
    if ctx.carried:
        ctx.graph.accumulate(ids, g_values, g_keys)
        return
    old = _old(ctx, ids)
    if ctx.n_local:
        _local_add(local, _local_rows(ctx, ids, old), torch.cat([g_values, g_keys], -1), old)


def _delta_credit(ctx, r: _Read, g_key: Tensor, key_rows: list,
                  local: Optional[Tensor]) -> None:
    """δ's memory's key gradient (B, 1, d) goes to W_k through its stored value, whichever chunk
    wrote it: this chunk's memories collect it with their keys' (one row of W_k's product per
    memory), a carried memory's goes straight into ``key_rows`` (every one's, when the chunk's
    memories share the carried graph: ``local`` is not there)."""
    if local is None:
        key_rows.append((g_key, r.m_delta))
        return
    old = _old(ctx, r.delta_ids)
    H = r.m_delta.shape[-1]  # the key part of the rows [value | key]
    _local_add(local[:, H:], _local_rows(ctx, r.delta_ids, old), g_key, old)
    if old is not None:
        key_rows.append((g_key * old, r.m_delta))
