"""The memory bank of SPEC §2.2–2.3, with a backward pass that touches only what attention read.

A bank holds the memories ``m_i = h(t_i)`` of one layer, ``(B, n, H)``, and their cached keys
``W_k m_i``, ``(B, n, d_k)``, in preallocated buffers (grown by doubling, so a write is O(1), never
an O(n) concatenation); on request (``ranking_keys``) also what the scorer's ranking computes
from each key alone (the MLP scorer's ``e^{−2k}``), kept up to date slot by slot.  The buffers
hold *values* only; the autograd graph is routed through two small custom functions, so that
attention over ``n`` memories costs ``O(B·k_top·H)`` per step in the backward pass instead of a
dense ``(B, n, H)`` gradient per step (SPEC §9a):

* ``_Write`` at the step a memory is written: takes ``h(t_i)`` and its key (with their graphs) and
  returns a *token*, a scalar that chains every write of the bank: ``token_i = Write(h, key,
  token_{i-1})``.
* ``_Gather`` at a step that reads memories: takes the current token and returns the selected
  memories and keys.  Its backward adds the incoming gradient into per-memory accumulators
  (``index_add_`` on the selected rows only) and passes a zero to the token.

Why the token chain: autograd runs a node only after every node that consumes its output.  Every
gather that could read memory ``i`` consumes ``token_j`` for some ``j ≥ i``, and ``token_j``
depends on ``token_i``, so ``Write_i``'s backward runs after all of them, when the accumulator of
memory ``i`` is complete; it then hands that gradient to ``h(t_i)`` and its key, and autograd
continues through ``t_i``'s block as usual (multi-hop credit, SPEC §3).  A memory that no one
selected returns no gradient at all.

Eviction (``max_memories``): when the bank is full, a new memory overwrites the oldest one (a ring).
Memory *ids* count writes from the start of the stream and never repeat; slots are reused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.autograd import Function

__all__ = ["MemoryBank"]


class _Graph:
    """Gradient accumulators shared by the writes and gathers of one autograd graph of one bank.

    Memories get rows ``id - first_id``; memories carried in detached (ids below ``first_id``)
    are not in the graph and their gradient is dropped, like a detached state.  The sparse engine
    passes its own buffers (``grad_v``, ``grad_k``) covering every memory of a chunk, so the
    gradient that later blocks sent to a memory is waiting in its row when its block is
    recomputed, and ``_Write`` hands it over together with the block's own.
    """

    def __init__(self, first_id: int, grad_v: Optional[Tensor] = None,
                 grad_k: Optional[Tensor] = None):
        self.first_id = first_id
        self.n_ids = 0 if grad_v is None else grad_v.shape[1]  # rows needed so far
        self.grad_v = grad_v  # (B, n_ids, H)
        self.grad_k = grad_k  # (B, n_ids, d_k)
        self.touched = None if grad_v is None else torch.zeros(
            grad_v.shape[1], dtype=torch.bool, device=grad_v.device)  # (n_ids,) any credit
        self.cut = None  # (n_ids,) memories cut off from credit (the sparse engine's credit_tol)

    def _ensure(self, like_v: Tensor, like_k: Tensor) -> None:
        B, H, dk = like_v.shape[0], like_v.shape[-1], like_k.shape[-1]
        have = 0 if self.grad_v is None else self.grad_v.shape[1]
        if have < self.n_ids:
            grad_v = like_v.new_zeros(B, self.n_ids, H)
            grad_k = like_k.new_zeros(B, self.n_ids, dk)
            touched = torch.zeros(self.n_ids, dtype=torch.bool, device=like_v.device)
            if have:
                grad_v[:, :have] = self.grad_v
                grad_k[:, :have] = self.grad_k
                touched[:have] = self.touched
            if self.cut is not None:
                cut = torch.zeros_like(touched)
                cut[:self.cut.shape[0]] = self.cut
                self.cut = cut
            self.grad_v, self.grad_k, self.touched = grad_v, grad_k, touched

    def accumulate(self, ids: Tensor, gv: Tensor, gk: Tensor) -> None:
        """Add ``gv`` (B, m, H) and ``gk`` (B, m, d_k) into the rows of memories ``ids`` (B, m).
        A memory counts as touched only where its credit is not exactly zero (a memory read
        with zero weight — its score tied with δ — or by a step that no credit reached gets
        zeros): the sparse engine need not visit its block."""
        self._ensure(gv, gk)
        B, m = ids.shape
        rel = ids - self.first_id  # (B, m)
        valid = rel >= 0  # older memories came in detached
        if self.cut is not None:  # memories cut off get nothing, from any read
            valid = valid & ~self.cut[rel.clamp(0, self.cut.shape[0] - 1)]
        touched = valid & ((gv != 0).any(-1) | (gk != 0).any(-1))  # (B, m)
        if not bool(valid.all()):
            gv = gv * valid.unsqueeze(-1)
            gk = gk * valid.unsqueeze(-1)
            rel = rel.clamp_min(0)
        n = self.grad_v.shape[1]
        flat = _flat_rows(rel, n)  # (B*m,)
        self.grad_v.view(B * n, -1).index_add_(0, flat, gv.reshape(B * m, -1))
        self.grad_k.view(B * n, -1).index_add_(0, flat, gk.reshape(B * m, -1))
        self.touched[rel[touched]] = True

    def is_touched(self, lo: int, hi: int) -> bool:
        """Did any memory with id in ``[lo, hi)`` receive credit?"""
        if self.touched is None:
            return False
        return bool(self.touched[max(lo - self.first_id, 0): max(hi - self.first_id, 0)].any())

    def cut_small(self, lo: int, hi: int, tol: float, scale: float) -> tuple[List[int], float]:
        """The sparse engine's opt-in credit tolerance: of the memories with id in ``[lo, hi)``
        that hold credit, cut off those whose credit norm (values and keys, over the batch) is
        below ``tol · G``, ``G = max(scale, the largest norm among them)``: their credit is
        discarded and no read sends them any from now on (as if detached).  Returns the ids cut
        and ``G``."""
        if self.touched is None or hi <= lo:
            return [], scale
        a, b = max(lo - self.first_id, 0), max(hi - self.first_id, 0)
        b = min(b, self.touched.shape[0])
        if b <= a or not bool(self.touched[a:b].any()):
            return [], scale
        norms = (self.grad_v[:, a:b].pow(2).sum((0, 2))
                 + self.grad_k[:, a:b].pow(2).sum((0, 2))).sqrt()  # (b - a,)
        scale = max(scale, float(norms.max()))
        small = self.touched[a:b] & (norms < tol * scale)
        rows = small.nonzero().flatten()
        if rows.numel():
            if self.cut is None:
                self.cut = torch.zeros_like(self.touched)
            self.cut[a + rows] = True
            self.touched[a + rows] = False
            self.grad_v[:, a + rows] = 0
            self.grad_k[:, a + rows] = 0
        return [self.first_id + a + int(r) for r in rows], scale

    def take(self, mem_id: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The accumulated gradient of one memory, (B, H) and (B, d_k); zeroed once taken."""
        row = mem_id - self.first_id
        if self.grad_v is None or row >= self.grad_v.shape[1] or not bool(self.touched[row]):
            return None, None
        gv, gk = self.grad_v[:, row].clone(), self.grad_k[:, row].clone()
        self.grad_v[:, row] = 0
        self.grad_k[:, row] = 0
        self.touched[row] = False
        return gv, gk


class _Write(Function):
    """Write ``h`` (B, H) and ``key`` (B, d_k) into ``slot``; returns the next token."""

    @staticmethod
    def forward(ctx, h, key, token, bank, slot, mem_id):
        bank.values[:, slot] = h.detach()
        bank.keys[:, slot] = key.detach()
        ctx.graph, ctx.mem_id, ctx.first = bank.graph, mem_id, token is None
        return h.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_token):
        gv, gk = ctx.graph.take(ctx.mem_id)
        return gv, gk, None if ctx.first else _grad_token, None, None, None


class _Gather(Function):
    """Read rows ``slots`` (B, m) of the bank; backward scatters into the selected rows only."""

    @staticmethod
    def forward(ctx, token, values, keys, slots, ids, graph):
        ctx.graph = graph
        ctx.save_for_backward(ids)
        ctx.mark_non_differentiable(ids)
        flat = _flat_rows(slots, values.shape[1])
        return _gather_rows(values, slots, flat), _gather_rows(keys, slots, flat)

    @staticmethod
    def backward(ctx, gv, gk):
        (ids,) = ctx.saved_tensors
        ctx.graph.accumulate(ids, gv, gk)
        return torch.zeros((), dtype=gv.dtype, device=gv.device), None, None, None, None, None


def _flat_rows(slots: Tensor, cap: int) -> Tensor:
    """Rows of a (B·cap, D) view of a bank buffer for ``slots`` (B, m) → (B·m,)."""
    return (slots + _row_offsets(slots.shape[0], cap, slots.device)).reshape(-1)


@functools.lru_cache(maxsize=64)
def _row_offsets(batch: int, cap: int, device: torch.device) -> Tensor:
    """(B, 1): the first row of each batch element in a (B·cap, D) view, made once per shape
    (every read gathers: three tensor operations a read saved)."""
    return torch.arange(batch, device=device).unsqueeze(1) * cap


def _gather_rows(buf: Tensor, slots: Tensor, flat: Optional[Tensor] = None) -> Tensor:
    """``buf`` (B, cap, D), ``slots`` (B, m) → (B, m, D); ``flat``: ``_flat_rows`` of the
    slots, when the caller reads several buffers at the same slots."""
    B, cap, D = buf.shape
    m = slots.shape[1]
    flat = _flat_rows(slots, cap) if flat is None else flat  # (B*m,)
    return buf.reshape(B * cap, D).index_select(0, flat).view(B, m, D)  # 5× faster than gather


@dataclass
class MemoryBank:
    """The memories of one layer for a batch: values, cached keys and where they came from.

    ``values`` (B, cap, H) and ``keys`` (B, cap, d_k) hold ``count`` valid slots;
    ``slot_ids`` (cap,) the global id of each slot and ``slot_steps`` (cap,) the global step at
    which it was written.  ``next_id`` counts every write since the stream began.

    Two layouts of the valid slots, ``[start, stop)`` = :meth:`window`:

    * ring (default): slots ``[0, count)``; once ``max_memories`` are held, a write overwrites the
      oldest slot (``head``), so the buffers never exceed ``max_memories``.
    * linear (``linear=True``, used by the sparse engine over an append-only store): slots
      ``[head, head + count)``; eviction moves ``head`` forward, nothing is overwritten, so the
      bank as it was before any step is a window of the same buffers.
    """

    values: Tensor
    keys: Tensor
    slot_ids: Tensor
    slot_steps: Tensor
    count: int = 0
    head: int = 0  # ring: slot of the oldest memory once full; linear: first valid slot
    next_id: int = 0
    max_memories: Optional[int] = None
    graph: Optional[_Graph] = None
    token: Optional[Tensor] = None
    linear: bool = False
    # what the scorer's ranking caches beside each key (``ranking_keys``), (B, cap, d_k), and
    # the slots written since it was last brought up to date; a copy of the bank starts without
    rank_cache: Optional[Tensor] = None
    stale: List[int] = field(default_factory=list)

    @classmethod
    def empty(cls, batch: int, hidden: int, key_dim: int, *, max_memories=None, device=None,
              dtype=None, capacity: int = 16, linear: bool = False) -> "MemoryBank":
        cap = capacity if max_memories is None or linear else max(1, min(capacity, max_memories))
        return cls(
            values=torch.zeros(batch, cap, hidden, device=device, dtype=dtype),
            keys=torch.zeros(batch, cap, key_dim, device=device, dtype=dtype),
            slot_ids=torch.full((cap,), -1, dtype=torch.long, device=device),
            slot_steps=torch.full((cap,), -1, dtype=torch.long, device=device),
            max_memories=max_memories, linear=linear,
        )

    # -- shape --------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.values.shape[2]

    @property
    def key_size(self) -> int:
        return self.keys.shape[2]

    def __len__(self) -> int:
        return self.count

    def window(self) -> tuple[int, int]:
        """The valid slots are ``[start, stop)``."""
        start = self.head if self.linear else 0
        return start, start + self.count

    # -- state handling -----------------------------------------------------------------------
    def fork(self) -> "MemoryBank":
        """A copy whose writes do not change ``self`` (same graph: credit still flows back)."""
        return replace(self, values=self.values.clone(), keys=self.keys.clone(),
                       slot_ids=self.slot_ids.clone(), slot_steps=self.slot_steps.clone(),
                       rank_cache=None, stale=[])

    def detach(self) -> "MemoryBank":
        """The same memories, cut from the graph (like ``repackage_hidden``, SPEC §3)."""
        return replace(self, graph=None, token=None, rank_cache=None, stale=[])

    def to(self, *args, **kwargs) -> "MemoryBank":
        values = self.values.to(*args, **kwargs)
        return replace(self, values=values, keys=self.keys.to(*args, **kwargs),
                       slot_ids=self.slot_ids.to(values.device),
                       slot_steps=self.slot_steps.to(values.device), rank_cache=None, stale=[])

    @property
    def requires_grad(self) -> bool:
        return self.token is not None and self.token.requires_grad

    def ids(self) -> Tensor:
        """Global ids of the valid memories, in slot order: (count,)."""
        start, stop = self.window()
        return self.slot_ids[start:stop]

    def memories(self) -> Tensor:
        """The valid memories in chronological order, (B, count, H) — a copy, no graph."""
        start, stop = self.window()
        order = self.slot_ids[start:stop].argsort()
        return self.values[:, start:stop][:, order]

    def chronological(self) -> "MemoryBank":
        """A compact ring bank of the same memories, oldest in slot 0, without graph."""
        start, stop = self.window()
        order = self.slot_ids[start:stop].argsort() + start  # (count,) slots, oldest first
        bank = MemoryBank.empty(self.batch_size, self.hidden_size, self.key_size,
                                max_memories=self.max_memories, device=self.values.device,
                                dtype=self.values.dtype, capacity=max(1, self.count))
        bank.values[:, : self.count] = self.values[:, order]
        bank.keys[:, : self.count] = self.keys[:, order]
        bank.slot_ids[: self.count] = self.slot_ids[order]
        bank.slot_steps[: self.count] = self.slot_steps[order]
        bank.count, bank.next_id = self.count, self.next_id
        return bank

    # -- writing ------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Double the capacity (ring: up to ``max_memories``), oldest memory first in slot 0."""
        cap = self.values.shape[1]
        new_cap = cap * 2 if self.max_memories is None or self.linear \
            else min(cap * 2, self.max_memories)
        if self.linear:
            order = torch.arange(cap, device=self.values.device)  # keep slots where they are
        else:
            order = (torch.arange(cap, device=self.values.device) + self.head) % cap  # (cap,)

        def grown(buf: Tensor, dim: int, fill) -> Tensor:
            shape = list(buf.shape)
            shape[dim] = new_cap
            out = buf.new_full(shape, fill)
            out.narrow(dim, 0, cap).copy_(buf.index_select(dim, order))
            return out

        self.values, self.keys = grown(self.values, 1, 0), grown(self.keys, 1, 0)
        self.slot_ids, self.slot_steps = grown(self.slot_ids, 0, -1), grown(self.slot_steps, 0, -1)
        self.rank_cache = None  # rebuilt at the next ranking (slots moved)
        if not self.linear:
            self.head = 0

    def _next_slot(self) -> int:
        cap = self.values.shape[1]
        full = self.max_memories is not None and self.count == self.max_memories
        if self.linear:
            if full:
                self.head += 1  # evict the oldest: the window slides
                self.count -= 1
            if self.head + self.count == cap:
                self._grow()
            self.count += 1
            return self.head + self.count - 1
        if self.count == cap and not full:
            self._grow()
            cap = self.values.shape[1]
        if full:  # evict the oldest memory: its slot is reused
            slot = self.head
            self.head = (self.head + 1) % cap
            return slot
        self.count += 1
        return (self.head + self.count - 1) % cap

    def write(self, h: Tensor, key: Tensor, step: int) -> int:
        """Append memory ``h`` (B, H) with its key (B, d_k), written at global ``step``.

        Returns the memory's id."""
        slot = self._next_slot()
        mem_id = self.next_id
        self.next_id += 1
        self.slot_ids[slot] = mem_id
        self.slot_steps[slot] = step
        if self.rank_cache is not None:
            self.stale.append(slot)
        if torch.is_grad_enabled() and (h.requires_grad or key.requires_grad):
            if self.graph is None:
                self.graph = _Graph(first_id=mem_id)
            self.graph.n_ids = max(self.graph.n_ids, mem_id - self.graph.first_id + 1)
            self.token = _Write.apply(h, key, self.token, self, slot, mem_id)
        else:
            self.values[:, slot] = h.detach()
            self.keys[:, slot] = key.detach()
        return mem_id

    # -- reading ------------------------------------------------------------------------------
    def ranking_keys(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn`` of the keys, (B, cap, d_k) in slot order, valid in the :meth:`window`, cached:
        computed for the window the first time (and after the buffers grew), then only for the
        slots written since (one memory per ``k_att`` steps).  ``fn`` is the scorer's
        ``rank_keys``; one function per bank (the cache does not know which ``fn`` filled it)."""
        if self.rank_cache is None or self.rank_cache.shape != self.keys.shape:
            start, stop = self.window()
            self.rank_cache = torch.empty_like(self.keys)  # slots outside the window: unset
            self.rank_cache[:, start:stop] = fn(self.keys[:, start:stop])
        elif self.stale:
            slots = sorted(set(self.stale))
            if len(slots) == 1:
                self.rank_cache[:, slots[0]] = fn(self.keys[:, slots[0]])
            else:
                idx = torch.tensor(slots, device=self.keys.device)
                self.rank_cache[:, idx] = fn(self.keys[:, idx])
        self.stale.clear()
        return self.rank_cache

    def gather(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Memories and keys at ``slots`` (B, m) → (B, m, H), (B, m, d_k), credit-routed."""
        if torch.is_grad_enabled() and self.requires_grad:
            ids = self.slot_ids[slots]  # (B, m)
            return _Gather.apply(self.token, self.values, self.keys, slots, ids, self.graph)
        flat = _flat_rows(slots, self.values.shape[1])
        return _gather_rows(self.values, slots, flat), _gather_rows(self.keys, slots, flat)

    def stored_values(self, slots: Tensor) -> Tensor:
        """The memories at ``slots`` (B, m) → (B, m, H) as stored: values without a graph, so
        nothing computed from them sends credit to a memory."""
        return _gather_rows(self.values, slots)

    def gather_all(self) -> tuple[Tensor, Tensor]:
        """All valid memories and keys, (B, n, H), (B, n, d_k), in slot order."""
        start, stop = self.window()
        slots = torch.arange(start, stop, device=self.values.device).expand(self.batch_size, -1)
        return self.gather(slots)
