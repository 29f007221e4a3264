"""Engines: one training forward + backward over a chunk, with per-step losses (SPEC §4).

Every engine has the same signature, so the trainer uses any of them for every task::

    result = forward_backward(model, x, loss_fn, state=None, engine="reference")

* ``x`` — the chunk, time-major ``(T, B, I)`` (models must not be ``batch_first`` here).
* ``loss_fn(start, stop, output, summary)`` — the loss of steps ``[start, stop)`` of the chunk,
  given the top layer's ``output`` h(t) and ``summary`` s(t), each ``(stop - start, B, H)``
  (the summary is zeros for models without memory).  It returns a scalar tensor, or ``None`` when
  those steps carry no loss.  The chunk's loss is the *sum* over the calls: normalise inside
  (e.g. divide a cross-entropy sum by ``T·B``).  An engine may call it once for the whole chunk
  (reference) or once per block (sparse), so it must be additive over step ranges.  An optional
  attribute ``loss_fn.loss_steps`` lists the steps that carry a loss (e.g. the last one): the
  sparse engine then skips blocks without one, and recomputes a block only up to its last loss
  step or its last memory with credit (credit flows back in time only).
* The engine calls backward itself: gradients are *accumulated* into ``.grad`` of the parameters.
* Returns an :class:`EngineResult`: the loss value, the state for the next chunk (detached:
  backward has run), the attention records when asked, and counters of the work done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .layer import ForwardLog, SABLSTM
from .memory import MemoryBank, _Graph
from .state import AttentionRecord, RecurrentState

__all__ = ["forward_backward", "EngineResult", "ENGINES", "LossFn"]

LossFn = Callable[[int, int, Tensor, Tensor], Optional[Tensor]]


@dataclass
class EngineResult:
    loss: Tensor  # scalar, detached
    state: RecurrentState  # detached, for the next chunk
    attention: Optional[List[AttentionRecord]] = None
    stats: dict = field(default_factory=dict)  # e.g. steps_backpropagated


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def reference(model: nn.Module, x: Tensor, loss_fn: LossFn, state=None,
              return_attention: bool = False, credit_tol: float = 0.0) -> EngineResult:
    """Plain autograd over the whole chunk: keeps the graph of every step (SPEC §4)."""
    if credit_tol:
        raise ValueError(f"credit_tol={credit_tol!r} needs engine='sparse' (the reference engine "
                         "computes the exact gradient)")
    if getattr(_unwrap(model), "batch_first", False):
        raise ValueError("engines take time-major input: build the model with batch_first=False")
    output, new_state, records = model(x, state, return_attention=True)  # (T, B, H)
    T = output.shape[0]
    loss = loss_fn(0, T, output, records[-1].summary)
    if loss is None:
        raise ValueError("loss_fn returned None for the whole chunk: nothing to train on")
    if loss.requires_grad:
        loss.backward()
    return EngineResult(loss.detach(), new_state.detach(), records if return_attention else None,
                        {"steps": T, "steps_backpropagated": T})


# -- the sparse backtracking engine (SPEC §4) ---------------------------------------------------
#
# Forward, no graph: for every layer keep only what a block needs to be recomputed — the (h, c)
# entering each truncation block and the memory window then — plus the memory bank itself, an
# append-only store of values and cached keys.  Backward sweeps the blocks of the top layer in
# reverse; for each block:
#
#   loss in it?  or  credit waiting for a memory written in it?  ── neither ──> skip the block
#        │ yes
#        ▼
#   recompute the block with a graph, from its boundary up to the last step credit enters at (its
#   last loss step or its last memory with credit: later steps get none); the bank is a window
#   onto the store, and its gradient accumulators are the engine's own (one row per memory of
#   the chunk):
#     · reads of earlier memories add credit to their rows (injected when their block comes),
#     · each memory written in the block collects its row — credit from later blocks and from
#       this one — when autograd reaches its write (the token chain of sab.memory).
#   backward(loss of the block), input gradient kept for the layer below.
#
# Dropout between layers draws its masks in the forward pass and keeps them, so a recomputed block
# sees the same mask (the same distribution as the reference engine's F.dropout, other draws).
#
# Lower layers are swept the same way, their "loss" being the gradient w.r.t. their outputs that
# the layer above sent back.  Because blocks interact only through memories (the recurrent path is
# cut at every boundary), this visits exactly the blocks that the reference engine's backward
# sends non-zero credit to, and the gradients are equal.


@dataclass
class _LayerPlan:
    inputs: Tensor  # (T, B, I_l) the layer's input values (after dropout)
    mask: Optional[Tensor]  # (T, B, I_l) dropout scale applied to the input, or None
    store: Optional["MemoryBank"]  # linear bank: every memory visible during the chunk
    log: ForwardLog  # the state entering every block, the ranking of every step that attended


def _block_has_loss(loss_fn, start: int, stop: int) -> bool:
    steps = getattr(loss_fn, "loss_steps", None)
    if steps is None:
        return True
    return any(start <= t < stop for t in steps)


def _credited_stop(start: int, stop: int, loss_last: int, graph: Optional[_Graph],
                   store: Optional[MemoryBank], lo_id: int, hi_id: int, step0: int) -> int:
    """One past the last step of block [start, stop) that credit enters at: ``loss_last`` (its
    last step with a loss, or -1) or the write step of its last memory with credit (ids in
    [lo_id, hi_id)).  The recurrent path is cut at the block's start and credit only flows
    back in time, so the steps after it get none: they are not recomputed."""
    last = loss_last
    if graph is not None and graph.touched is not None and hi_id > lo_id:
        rows = graph.touched[max(lo_id - graph.first_id, 0): max(hi_id - graph.first_id, 0)]
        hit = rows.nonzero()
        if hit.numel():
            mem_id = max(lo_id, graph.first_id) + int(hit[-1])  # the latest with credit
            slot = mem_id - (store.next_id - (store.head + store.count))  # linear store
            last = max(last, int(store.slot_steps[slot]) - step0)
    return min(stop, last + 1)


def _linear_store(layer, l: int, carried, T: int, B: int, like: Tensor):
    """An append-only bank holding the carried memories (oldest first) and room for the chunk."""
    n_carried = 0 if carried is None else len(carried)
    capacity = n_carried + T // layer.k_att + 1
    store = MemoryBank.empty(B, layer.hidden_size, layer.scorers[l].key_size,
                             max_memories=layer.max_memories, device=like.device,
                             dtype=like.dtype, capacity=capacity, linear=True)
    if n_carried:
        old = carried.chronological()
        store.values[:, :n_carried] = old.values[:, :n_carried]
        store.keys[:, :n_carried] = old.keys[:, :n_carried]
        store.slot_ids[:n_carried] = old.slot_ids[:n_carried]
        store.slot_steps[:n_carried] = old.slot_steps[:n_carried]
        store.count, store.next_id = n_carried, old.next_id
    return store


def check_credit_tol(credit_tol) -> None:
    """``credit_tol`` must be a number in [0, 1); raises ValueError."""
    if isinstance(credit_tol, bool) or not isinstance(credit_tol, (int, float)) \
            or not 0.0 <= credit_tol < 1.0:
        raise ValueError(f"credit_tol must be a number in [0, 1), got {credit_tol!r}")


def sparse(model: nn.Module, x: Tensor, loss_fn: LossFn, state=None,
           return_attention: bool = False, credit_tol: float = 0.0) -> EngineResult:
    """Sparse backtracking (SPEC §4): recompute only the blocks that hold a loss or credit.

    ``credit_tol`` (default 0: the exact gradient, equal to the reference engine's) is an opt-in
    approximation, *not SAB's credit rule*: when the sweep reaches a block, a memory written in
    it whose credit from later blocks has norm ‖g_i‖ (values and keys, over the batch) below
    ``credit_tol · G`` — G the largest such norm met so far in this layer's sweep, this block's
    included — is cut off: its credit is discarded and the reads inside its own block send it
    none (the reference engine with that memory detached computes the same), and a block left
    without loss or credit is skipped.  ``stats`` then counts ``memories_cut`` and lists their
    ids per layer in ``cut_ids``."""
    layer = _unwrap(model)
    if not isinstance(layer, SABLSTM) or layer.dense:
        raise ValueError(f"the sparse engine runs SABLSTM models; use engine='reference' for "
                         f"{type(layer).__name__}")
    if layer.batch_first:
        raise ValueError("engines take time-major input: build the model with batch_first=False")
    if torch.is_tensor(x) and x.dim() != 3:
        raise ValueError("the sparse engine takes batched input (T, B, I)")
    check_credit_tol(credit_tol)
    x_in = x
    x, _ = layer._prepare_input(x.detach())  # (T, B, I)
    T, B, _ = x.shape
    st = layer._prepare_state(state, B, True, x).detach()  # each chunk is its own graph
    L = layer.num_layers

    # ---- forward without graph ----------------------------------------------------------------
    plans: List[_LayerPlan] = []
    hs, cs, records = [], [], []
    with torch.no_grad():
        layer_in = x
        for l in range(L):
            mask = None
            if l > 0 and layer.dropout > 0 and layer.training:
                keep = 1.0 - layer.dropout
                mask = torch.bernoulli(torch.full_like(layer_in, keep)) / keep  # (T, B, H)
                layer_in = layer_in * mask
            store = _linear_store(layer, l, st.memory[l], T, B, x) if layer.attends else None
            log = ForwardLog(T, B, layer.hidden_size, layer.k_trunc, layer.k_top, x)
            out, h, c, rec = layer._run_layer(l, layer_in, st.h[l], st.c[l], store, st.step,
                                              return_attention, log, keep_outputs=l < L - 1)
            plans.append(_LayerPlan(layer_in, mask, store, log))
            hs.append(h)
            cs.append(c)
            records.append(rec)
            layer_in = out

    # ---- backward: reverse sweep over blocks ---------------------------------------------------
    total = x.new_zeros(())
    visited = skipped = 0
    cut_ids: List[List[int]] = [[] for _ in range(L)]
    grad_out: Optional[Tensor] = None  # (T, B, H) credit for the current layer's outputs
    need_input_grad = x_in.requires_grad
    for l in reversed(range(L)):
        plan = plans[l]
        store = plan.store
        graph = None
        if store is not None:
            first_id = store.next_id - (store.head + store.count)  # id of slot 0
            n_rows = store.values.shape[1]
            graph = _Graph(first_id, store.values.new_zeros(B, n_rows, layer.hidden_size),
                           store.keys.new_zeros(B, n_rows, store.key_size))
        scale = 0.0  # G of credit_tol: the largest credit norm of a memory met so far
        want_in = l > 0 or need_input_grad
        grad_in = torch.zeros_like(plan.inputs) if want_in else None
        log = plan.log
        nxt = log.boundaries[1:]
        stops = [b.t for b in nxt] + [T]
        end_ids = [b.next_id for b in nxt] + [0 if store is None else store.next_id]
        sel_ends = [b.selection_index for b in nxt] + [log.n_selections]
        for bnd, stop, end_id, sel_end in reversed(list(zip(log.boundaries, stops, end_ids,
                                                            sel_ends))):
            start = bnd.t
            if l == L - 1:
                has_loss = _block_has_loss(loss_fn, start, stop)
                loss_steps = getattr(loss_fn, "loss_steps", None)
                loss_last = -1 if not has_loss else stop - 1 if loss_steps is None else \
                    max(t for t in loss_steps if start <= t < stop)
            else:
                with_grad = grad_out[start:stop].flatten(1).any(1).nonzero()
                has_loss = bool(with_grad.numel())
                loss_last = start + int(with_grad[-1]) if has_loss else -1
            if credit_tol and graph is not None:
                ids, scale = graph.cut_small(bnd.next_id, end_id, credit_tol, scale)
                cut_ids[l] += ids
            has_credit = graph is not None and graph.is_touched(bnd.next_id, end_id)
            if not (has_loss or has_credit):
                skipped += 1
                continue
            stop = _credited_stop(start, stop, loss_last, graph, store, bnd.next_id, end_id,
                                  st.step)
            visited += stop - start
            with torch.enable_grad():
                inp = plan.inputs[start:stop].detach().requires_grad_(want_in)
                bank = None
                if store is not None:
                    bank = MemoryBank(store.values, store.keys, store.slot_ids, store.slot_steps,
                                      bnd.count, bnd.head, bnd.next_id, store.max_memories,
                                      graph, x.new_zeros((), requires_grad=True), linear=True)
                h0, c0 = log.state(bnd.index)
                out, _, _, rec = layer._run_layer(l, inp, h0, c0, bank, st.step + start,
                                                  l == L - 1, replay=log.replay(
                                                      bnd.selection_index, sel_end))
                roots, grads = [], []
                if l == L - 1:
                    loss = loss_fn(start, stop, out, rec.summary) if has_loss else None
                    if loss is not None:
                        total = total + loss.detach()
                        roots.append(loss)
                        grads.append(None)
                elif has_loss:
                    roots.append(out)
                    grads.append(grad_out[start:stop])
                if bank is not None and bank.token is not None and bank.token.grad_fn is not None:
                    # reach every write of the block, so each memory collects its credit
                    roots.append(bank.token)
                    grads.append(torch.zeros_like(bank.token))
                if roots:
                    torch.autograd.backward(roots, grads)
                if want_in and inp.grad is not None:
                    grad_in[start:stop] = inp.grad
        if want_in:
            grad_out = grad_in if plan.mask is None else grad_in * plan.mask
    if need_input_grad and grad_out is not None:
        x_in.backward(grad_out)

    memory = [None if p.store is None else p.store.chronological() for p in plans]
    new_state = RecurrentState(torch.stack(hs), torch.stack(cs), memory, st.step + T)
    return EngineResult(total, new_state, records if return_attention else None,
                        {"steps": T * L, "steps_backpropagated": visited,
                         "blocks_skipped": skipped, "memories_cut": sum(map(len, cut_ids)),
                         "cut_ids": cut_ids})


ENGINES = {"reference": reference, "sparse": sparse}


def forward_backward(model: nn.Module, x: Tensor, loss_fn: LossFn, state=None,
                     engine: str = "reference", return_attention: bool = False,
                     credit_tol: float = 0.0) -> EngineResult:
    """Forward and backward over one chunk with the chosen engine (see module docs);
    ``credit_tol`` > 0 (sparse engine only) drops negligible credit: see :func:`sparse`."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
    return ENGINES[engine](model, x, loss_fn, state, return_attention=return_attention,
                           credit_tol=credit_tol)
